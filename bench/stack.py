"""The service under test: its own PostgreSQL database, a web server and a Celery worker as subprocesses.

Everything the bench starts it also stops (process groups it created, by their id), and everything it
publishes to Redis lives under its own key prefix, deleted at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import requests

from bench.common import DATA_DIR, DB_NAME, KEY_PREFIX, LOG_DIR, PG_URL, REPO, bench_env
from tests.support import wait_until

TERMINAL = {"succeeded", "failed", "cancelled"}


def setup_django() -> None:
    """Configure this process like the bench's server (same env), so the harness can use the ORM."""
    os.environ.update(bench_env())
    import django

    django.setup()


def ensure_services() -> None:
    """Redis and PostgreSQL must answer; the project's script starts them where they are installed."""
    script = REPO / "scripts" / "ensure_services.sh"
    if script.exists():
        subprocess.run(["bash", str(script)], cwd=REPO, check=False, timeout=60)


def recreate_database() -> None:
    """A fresh bench database each run (drop, create), then the project's migrations."""
    import psycopg

    with psycopg.connect(f"{PG_URL}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DB_NAME}"')


def migrate() -> None:
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)


def reset_data_dir() -> None:
    """Job folders of earlier runs would collide with the fresh database's ids: remove them."""
    shutil.rmtree(DATA_DIR / "media" / "jobs", ignore_errors=True)
    (DATA_DIR / "media").mkdir(parents=True, exist_ok=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)


def bench_user(username: str = "bench", *, staff: bool = False) -> tuple[Any, str]:
    """A user and its API token."""
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    user, _ = get_user_model().objects.get_or_create(username=username, defaults={"is_staff": staff})
    if not user.has_usable_password():
        user.set_password("bench-password")
        user.save()
    token, _ = Token.objects.get_or_create(user=user)
    return user, token.key


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gunicorn_argv(port: int) -> list[str]:
    """The web server as the docker image runs it (gunicorn, compressor_app/gunicorn.py), on loopback."""
    argv = [str(REPO / ".venv" / "bin" / "gunicorn"), "-c", "python:compressor_app.gunicorn"]
    return argv + ["--bind", f"127.0.0.1:{port}", "compressor_app.wsgi:application"]


class Process:
    """A subprocess in its own process group, with its output in a log file; stop() ends the group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.log_path = LOG_DIR / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            try:  # the leader exited; its children (prefork pool) may not have
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


class Api:
    """The service's REST API over loopback with token auth (one requests.Session per thread)."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.session = self.new_session()

    def new_session(self) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Token {self.token}"
        return session

    def url(self, path: str) -> str:
        return path if path.startswith("http") else f"{self.base}{path}"

    def get(self, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        return self.session.get(self.url(path), **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 120)
        return self.session.post(self.url(path), **kwargs)

    def submit(self, payload: dict) -> dict:
        response = self.post("/api/v1/jobs/", json=payload)
        if response.status_code not in (200, 201):
            raise RuntimeError(f"Submission refused ({response.status_code}): {response.text[:500]}")
        return response.json()

    def wait_terminal(self, job_id: int, *, timeout: float, interval: float = 0.25) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(f"/api/v1/jobs/{job_id}/").json()
            if job.get("status") in TERMINAL:
                return job
            time.sleep(interval)
        raise TimeoutError(f"Job {job_id} did not finish within {timeout:.0f} s")


class Stack:
    """Web server (+ optional worker) for one bench run; use as a context manager (always stops)."""

    def __init__(self) -> None:
        self.web: Process | None = None
        self.worker: Process | None = None
        self.port = 0
        self.api: Api | None = None
        self.user = None
        self.token = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_web(self) -> None:
        self.user, self.token = bench_user()
        self.port = free_port()
        self.web = Process("web", gunicorn_argv(self.port), bench_env())
        self.api = Api(self.base, self.token)

        def ready() -> bool:
            if not self.web.alive():
                raise RuntimeError(f"The web server exited:\n{self.web.log_text()[-2000:]}")
            return self.api.get("/api/v1/presets/", timeout=5).status_code == 200

        try:
            wait_until(ready, timeout=90, what="the web server", not_yet=(OSError,))  # refused until it listens
        except AssertionError as exc:
            raise RuntimeError(f"{exc}\n{self.web.log_text()[-2000:]}") from None

    def start_worker(self) -> None:
        """One compression worker on the gpu and cpu queues, one job at a time (prefork, concurrency 1)."""
        name = f"bench-{os.getpid()}@%h"
        argv = [str(REPO / ".venv" / "bin" / "celery"), "-A", "compressor_app", "worker", "-Q", "gpu,cpu", "-c", "1"]
        argv += ["-n", name, "-l", "info", "--without-gossip", "--without-mingle"]
        self.worker = Process("worker", argv, bench_env())

        def ready() -> bool:
            if not self.worker.alive():
                raise RuntimeError(f"The worker exited:\n{self.worker.log_text()[-2000:]}")
            return " ready." in self.worker.log_text()

        wait_until(ready, timeout=120, what="the Celery worker", not_yet=(OSError,))  # no log file yet

    def worker_pool_pids(self) -> list[int]:
        import psutil

        if not self.worker:
            return []
        try:
            return [p.pid for p in psutil.Process(self.worker.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def wait_worker_warm(self, timeout: float = 120.0) -> None:
        """The worker child imports torch/transformers/llm-compressor in the background: wait for it."""
        import psutil

        def warm() -> bool:
            for pid in self.worker_pool_pids():
                try:
                    maps = Path(f"/proc/{pid}/maps").read_text()
                except OSError:
                    continue
                if "libtorch" in maps and psutil.Process(pid).cpu_percent(interval=0.5) < 20:
                    return True
            return False

        # A child that ended meanwhile (NoSuchProcess) is "not yet": the pool starts another.
        what = "the worker child to import torch"
        wait_until(warm, timeout=timeout, interval=0.5, what=what, not_yet=(psutil.Error,))

    def stop_worker(self) -> None:
        if self.worker:
            self.worker.stop()
            self.worker = None

    def close(self) -> None:
        for proc in (self.worker, self.web):
            if proc is not None:
                try:
                    proc.stop()
                except Exception:  # noqa: BLE001 - keep stopping the others
                    pass
        self.worker = self.web = None
        purge_redis()


def purge_redis() -> int:
    """Delete every Redis key this run published (its own prefix only)."""
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=5)
        keys = list(client.scan_iter(match=f"{KEY_PREFIX}*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    except Exception:  # noqa: BLE001 - best effort
        return 0
