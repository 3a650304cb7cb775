"""Production settings: the default environment, refusing to start without a secret key or with DEBUG, and
`manage.py check --deploy` clean. Each runs manage.py in a subprocess with a production environment."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

from tests.support import REPO


def production_env(**overrides: str) -> dict[str, str]:
    """The environment a deploy gives: no DJANGO_ENV (production is the default) and no development leftovers."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "COMPRESSOR_CACHE"))}
    env.update(
        DJANGO_SETTINGS_MODULE="compressor_app.settings",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS="compress.example.org",
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
