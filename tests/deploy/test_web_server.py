"""The docker image's web server, as its Dockerfile starts it: gunicorn with compressor_app/gunicorn.py."""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from compressor_app.gunicorn import LongLivedObjects
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]


def _image_command() -> list[str]:
    """The CMD of the Dockerfile (its exec form, a JSON list)."""
    text = (ROOT / "Dockerfile").read_text()
    return json.loads(re.search(r"^CMD (\[.*\])$", text, re.MULTILINE).group(1))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_images_web_server_starts_its_workers_and_answers_the_health_check(tmp_path):
    # Given the image's command, run from this environment on a free loopback port, with production settings
    command = _image_command()
    assert command[0] == "gunicorn"
    port = _free_port()
    command = [str(Path(sys.executable).with_name("gunicorn")), *command[1:], "--bind", f"127.0.0.1:{port}"]
    env = {
        **os.environ,
        "DJANGO_ENV": "production",
        "DJANGO_SECRET_KEY": "k" * 50,
        "DJANGO_HTTPS": "False",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        "COMPRESSOR_DATA_DIR": str(tmp_path),
        "WEB_CONCURRENCY": "2",
    }
    log = tmp_path / "web.log"
    with log.open("w") as out:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # When it has started
        def answers() -> requests.Response | None:
            assert server.poll() is None, f"gunicorn exited:\n{log.read_text()[-3000:]}"
            try:
                return requests.get(f"http://127.0.0.1:{port}/api/v1/schema/", timeout=10)
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or a worker still starting:
                return None  # in a new data folder each builds the lm-eval task index first (jobs.apps)

        response = wait_until(answers, timeout=120, what="gunicorn to answer the health check")

        # Then the health check (the compose file's) and the sign-in page answer, from two threaded workers
        assert response.status_code == 200, response.text[:500]
        assert "openapi" in response.text[:200]
        assert requests.get(f"http://127.0.0.1:{port}/accounts/login/", timeout=10).status_code == 200
        text = log.read_text()
        assert "Using worker: gthread" in text, text[-2000:]
        assert len(re.findall(r"Booting worker with pid", text)) == 2, text[-2000:]

        # And each worker, once it has loaded the app (the second may still be loading it), has moved what it
        # loaded out of the garbage collector's sight
        def workers_that_froze() -> set[str]:
            return set(re.findall(r"\[(\d+)\] \[INFO\] \d+ long-lived objects moved out", log.read_text()))

        wait_until(lambda: len(workers_that_froze()) == 2, timeout=120, what="both workers to log their freeze")
    finally:
        server.terminate()
        server.wait(timeout=60)


class _Loaded:
    """An object the collector tracks (gc.get_objects lists it until it is frozen)."""


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, *args) -> None:
        self.lines.append(message % args)


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()


def test_a_worker_freezes_what_it_loaded_at_start_and_after_its_first_requests(unfrozen):
    # Given a worker's long-lived objects, frozen at its start and after 1 and 10 requests
    long_lived = LongLivedObjects(after_requests=(1, 10))
    log = _Log()
    loaded_at_start = _Loaded()
    assert any(loaded_at_start is obj for obj in gc.get_objects())

    # When it starts
    long_lived.freeze(log)

    # Then what it had loaded is out of the collector's sight, and the log says how much
    assert gc.get_freeze_count() > 0
    assert not any(loaded_at_start is obj for obj in gc.get_objects())
    assert log.lines == [f"{gc.get_freeze_count()} long-lived objects moved out of the garbage collector's sight"]

    # When it serves requests, counted by several threads (a count can be skipped)
    loaded_by_a_request = _Loaded()
    for served in (1, 1, 3):
        long_lived.served(served, log)

    # Then it froze again once, after its first request, and nothing more until its tenth
    assert len(log.lines) == 2
    assert not any(loaded_by_a_request is obj for obj in gc.get_objects())
    for served in (5, 9):
        long_lived.served(served, log)
    assert len(log.lines) == 2
    long_lived.served(12, log)
    long_lived.served(40, log)
    assert len(log.lines) == 3
