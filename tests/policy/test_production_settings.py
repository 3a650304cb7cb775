"""Production settings: the default environment, refusing to start without a secret key or with DEBUG, and
`manage.py check --deploy` clean; and the README's commands in a fresh checkout after make wrote its .env.local.
Each runs manage.py in a subprocess with a production (or an empty) environment."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import REPO


def production_env(**overrides: str) -> dict[str, str]:
    """The environment a deploy gives: no DJANGO_ENV (production is the default) and no development leftovers."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "COMPRESSOR_CACHE"))}
    env.update(
        DJANGO_SETTINGS_MODULE="compressor_app.settings",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS="compress.example.org",
        DJANGO_ENV_FILE="",  # a checkout's .env.local (make's) must not turn these into development settings
    )
    env.update(overrides)
    return {key: value for key, value in env.items() if value is not None}


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_deploy_check_is_clean_with_production_settings():
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=production_env())

    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout, result.stdout + result.stderr


def test_production_refuses_to_start_without_a_secret_key():
    # A deploy that forgets both DJANGO_ENV and DJANGO_SECRET_KEY must not run with a known key.
    result = manage("check", env=production_env(DJANGO_SECRET_KEY=None))

    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is required in production" in result.stderr


def test_production_refuses_debug():
    result = manage("check", env=production_env(DJANGO_DEBUG="True"))

    assert result.returncode != 0
    assert "DJANGO_DEBUG=True is refused in production" in result.stderr


def fresh_checkout(folder: Path) -> Path:
    """The tracked files only, as `git clone` gives them: no .env.local, no var/."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (REPO / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)
    return folder


def test_the_readme_commands_run_in_a_fresh_checkout_after_make_writes_its_env_file(tmp_path):
    checkout = fresh_checkout(tmp_path / "checkout")
    bare = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}  # a shell with nothing of ours set

    def run(*command: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=checkout, env=bare | extra, capture_output=True, text=True, timeout=300)

    # Given a fresh checkout, production's refusal is what manage.py gives before make ran.
    refused = run(sys.executable, "manage.py", "compress", "--list-presets")
    assert refused.returncode != 0
    assert "DJANGO_SECRET_KEY is required in production" in refused.stderr

    # When make demo / make up write .env.local (the same rule, alone), the README's commands run as written.
    made = run("make", "--no-print-directory", ".env.local", f"PYTHON={sys.executable}")
    assert made.returncode == 0, made.stdout + made.stderr
    assert (checkout / ".env.local").stat().st_mode & 0o777 == 0o600
    (checkout / "var").mkdir()  # make demo's model store made the data folder
    presets = run(sys.executable, "manage.py", "compress", "--list-presets")
    assert presets.returncode == 0, presets.stderr
    assert "int8-w8a8-gptq" in presets.stdout
    assert run(sys.executable, "manage.py", "migrate", "--noinput").returncode == 0
    superuser = run(
        sys.executable,
        "manage.py",
        "createsuperuser",
        "--noinput",
        "--username",
        "ops",
        "--email",
        "ops@example.org",
        DJANGO_SUPERUSER_PASSWORD=secrets.token_urlsafe(16),
    )
    assert superuser.returncode == 0, superuser.stderr
    assert "Superuser created successfully" in superuser.stdout

    # The key is the checkout's own, not a known one, and git keeps the file out of commits.
    key = dict(line.split("=", 1) for line in (checkout / ".env.local").read_text().splitlines())["DJANGO_SECRET_KEY"]
    assert len(key) >= 50 and "insecure" not in key
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env.local"], cwd=REPO)
    assert ignored.returncode == 0
