"""Packaging: the client installs alone (client/, no torch), and the lock (constraints.txt) is what the tested
environment holds and what make and the image install with."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))
    return {_name(name): pin for name, pin in pins.items()}


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_a_fresh_environment_with_the_client_alone_runs_compressor_and_has_no_torch(tmp_path):
    # Given a copy of the client's distribution and its code, as a clone has them
    for folder in ("client", "compressor_cli"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "build"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)

    # When only the client is installed into a fresh virtual environment (at the locked versions)
    pip = str(venv / "bin" / "pip")
    install = [pip, "install", "--quiet", str(tmp_path / "client"), "-c", str(ROOT / "constraints.txt")]
    result = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    # Then `compressor --help` works, and neither torch nor the server's packages came with it
    helped = subprocess.run([str(venv / "bin" / "compressor"), "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "usage: compressor" in helped.stdout, helped.stderr
    for heavy in ("torch", "llmcompressor", "transformers", "django", "celery"):
        imported = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {heavy}"], capture_output=True)
        assert imported.returncode != 0, f"{heavy} was installed with the client"
    listed = subprocess.run([pip, "list", "--format=freeze"], capture_output=True, text=True)
    installed = {_name(line.split("==")[0]) for line in listed.stdout.split()}
    assert installed <= {"compressor-client", "requests", "tqdm", "urllib3", "idna", "certifi", "charset-normalizer",
                         "pip", "setuptools"}, installed  # fmt: skip


def test_the_lock_pins_every_requirement_at_the_version_this_environment_tested():
    pins = _pins()
    extras = PROJECT["optional-dependencies"]
    for text in PROJECT["dependencies"] + extras["server"] + extras["dev"]:
        requirement = Requirement(text)
        name = _name(requirement.name)
        assert name in pins, f"{name} is not in constraints.txt (make lock)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
        installed = version(requirement.name).split("+")[0]
        assert installed == pins[name], f"{name} {installed} installed, {pins[name]} locked (make lock)"


def _joined(path: Path) -> list[str]:
    """The file's lines with backslash continuations joined (as make and docker read them)."""
    return path.read_text().replace("\\\n", " ").splitlines()


def test_make_and_the_image_install_with_the_lock_and_the_image_installs_dependencies_before_the_code():
    # make venv: every pip install of the project's environment goes through the lock
    makefile = _joined(ROOT / "Makefile")
    rule = makefile[next(i for i, line in enumerate(makefile) if line.startswith("$(STAMP):")) :]
    rule = rule[: next(i for i, line in enumerate(rule) if not line.strip())]
    assert "constraints.txt" in rule[0]  # a new lock reinstalls
    installs = [line for line in rule if "$(PIP) install" in line]
    assert len(installs) == 3 and all("-c constraints.txt" in line for line in installs), installs

    # The Dockerfile: pyproject.toml and the lock first, every dependency installed with it, then the code
    dockerfile = _joined(ROOT / "Dockerfile")
    code = dockerfile.index("COPY . .")
    assert any(line.split()[:3] == ["COPY", "pyproject.toml", "constraints.txt"] for line in dockerfile[:code])
    before = [line for line in dockerfile[:code] if "pip install" in line]
    assert len(before) == 2 and all("-c constraints.txt" in line for line in before), before
    after = [line for line in dockerfile[code:] if "pip install" in line and "/opt/vllm" not in line]
    assert len(after) == 1 and "--no-deps" in after[0], after
    # ...and the requirements it reads from pyproject.toml are the project's and its server extra's
    script = re.search(r'python -c "(.*?)" >', before[1]).group(1)
    read = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert read.stdout.split("\n")[:-1] == PROJECT["dependencies"] + PROJECT["optional-dependencies"]["server"]
