"""The docker image's web server, as its Dockerfile starts it: gunicorn with compressor_app/gunicorn.py."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import requests

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
            except requests.ConnectionError:
                return None

        response = wait_until(answers, timeout=120, what="gunicorn to answer the health check")

        # Then the health check (the compose file's) and the sign-in page answer, from two threaded workers
        assert response.status_code == 200, response.text[:500]
        assert "openapi" in response.text[:200]
        assert requests.get(f"http://127.0.0.1:{port}/accounts/login/", timeout=10).status_code == 200
        text = log.read_text()
        assert "Using worker: gthread" in text, text[-2000:]
        assert len(re.findall(r"Booting worker with pid", text)) == 2, text[-2000:]
    finally:
        server.terminate()
        server.wait(timeout=60)
