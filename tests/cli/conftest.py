"""Fixtures for the command-line client's tests: the live server (pytest-django), a token in a file, the CLI
run as a real subprocess, and a real Celery worker for this module only.

The worker is module-scoped and stopped at the module's end (not the jobs tests' session worker): a second
session-scoped worker on the same queues would take the jobs that tests/jobs/ keep queued on purpose.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.jobs.conftest import checkpoint  # noqa: F401  (checkpoint: a fixture used here)
from tests.support import QUEUES, REPO, running_worker, worker_env


@dataclass
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def cli_user(make_user, tmp_path):
    """A user with an API token, and the file that holds it."""
    from rest_framework.authtoken.models import Token

    user = make_user("carol")
    token_file = tmp_path / "token"
    token_file.write_text(Token.objects.create(user=user).key + "\n")
    user.token_file = token_file
    return user


@pytest.fixture
def compressor(live_server, cli_user, tmp_path):
    """compressor(*args, env=None, timeout=...): the CLI as its own process against the live server, with the
    user's token file in COMPRESSOR_TOKEN_FILE (env entries replace or, when None, remove variables).
    compressor.start(*args) starts it without waiting (a subprocess.Popen with text pipes)."""

    def environ(env: dict[str, str | None] | None) -> dict[str, str]:
        result = {k: v for k, v in os.environ.items() if not k.startswith("COMPRESSOR_TOKEN")}
        result |= {"COMPRESSOR_URL": live_server.url, "COMPRESSOR_TOKEN_FILE": str(cli_user.token_file)}
        for key, value in (env or {}).items():
            if value is None:
                result.pop(key, None)
            else:
                result[key] = value
        return {**result, "PYTHONPATH": str(REPO)}

    def start(*args: str, env: dict[str, str | None] | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "compressor_cli.main", *args],
            cwd=tmp_path,
            env=environ(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(*args: str, env: dict[str, str | None] | None = None, timeout: float = 120) -> Run:
        process = start(*args, env=env)
        try:
            out, err = process.communicate(timeout=timeout)
        finally:
            process.kill()
        return Run(process.returncode, out, err)

    run.start = start
    return run


@pytest.fixture(scope="module")
def cli_worker(django_db_setup, broker, media_root, hub_server, tmp_path_factory):
    """`celery worker` as its own process on the session's queues and test database, for this module."""
    from django.db import connection

    from compressor_app.celery import app

    log_path = tmp_path_factory.mktemp("cli-worker") / "worker.log"
    env = worker_env(settings_dict=connection.settings_dict, broker=broker, media_root=media_root, **hub_server.env)
    try:
        with running_worker(prefix="test-cli", queues=QUEUES, log_path=log_path, env=env) as worker:
            yield worker
    finally:
        with app.connection_for_write() as conn:
            for queue in QUEUES:
                conn.default_channel.queue_purge(queue)


@pytest.fixture
def free_port() -> Iterator[int]:
    """A local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield port


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
