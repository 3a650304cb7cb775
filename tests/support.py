"""Helpers shared by the integration tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.task_names import QUEUE_NAMES

REPO = Path(__file__).resolve().parents[1]
QUEUES = QUEUE_NAMES


def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float,
    interval: float = 0.25,
    what: str = "condition",
    not_yet: tuple[type[BaseException], ...] = (),
):
    """Poll until predicate() is truthy and return its value; fail after timeout seconds, naming what.

    not_yet: exceptions the predicate raises while the thing is still starting (a refused connection); any
    other exception ends the wait at once. The bench's harness waits with this function too."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except not_yet:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def database_url(settings_dict: dict) -> str:
    """The test database as a DATABASE_URL, for a worker process started by a test."""
    if settings_dict["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{settings_dict['NAME']}"
    user = settings_dict.get("USER") or "postgres"
    password = f":{settings_dict['PASSWORD']}" if settings_dict.get("PASSWORD") else ""
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = settings_dict.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{settings_dict['NAME']}"


def worker_env(*, settings_dict: dict, broker: dict[str, str], media_root: Path, **extra: str) -> dict[str, str]:
    """The environment of a worker process a test starts: this session's test database, its corner of Redis,
    its media folder, a short heartbeat; `extra` adds or replaces variables."""
    return {
        **os.environ,
        "DATABASE_URL": database_url(settings_dict),
        "CELERY_BROKER_URL": broker["url"],
        "CELERY_KEY_PREFIX": broker["prefix"],
        "COMPRESSOR_MEDIA_ROOT": str(media_root),
        "COMPRESSOR_HEARTBEAT_INTERVAL_S": "0.5",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def start_worker_process(*, name: str, queues: Iterable[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """`celery -A compressor_app worker` as its own process (one job at a time) in a session of its own, its
    output in log_path."""
    command = [
        sys.executable, "-m", "celery", "-A", "compressor_app", "worker", "-Q", ",".join(queues),
        "-c", "1", "-n", name, "--without-mingle", "--without-gossip", "-l", "INFO",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for_worker(process: subprocess.Popen, name: str, log_path: Path, *, timeout: float = 180) -> None:
    """Until the worker answers a ping on this session's broker; fails at once, with its log, if it exited."""
    from compressor_app.celery import app

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"The worker exited:\n{log_path.read_text(errors='replace')[-4000:]}")
        return bool(app.control.ping(destination=[name], timeout=1))

    wait_until(ready, timeout=timeout, what=f"the Celery worker {name} to answer")


def stop_worker_process(process: subprocess.Popen) -> None:
    """A warm shutdown (SIGTERM), then SIGKILL of its whole session after 30 s."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class LiveWorker:
    """A `celery worker` process a test started, with its log and its remote control."""

    name: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def control(self, command: str, **kwargs) -> Any:
        from compressor_app.celery import app

        return app.control.broadcast(command, destination=[self.name], reply=True, timeout=5, arguments=kwargs)

    def pause(self) -> None:
        """Stop taking compression jobs (the process keeps running): queued jobs stay queued."""
        for queue in ("gpu", "cpu"):
            assert self.control("cancel_consumer", queue=queue), self.log_tail()

    def resume(self) -> None:
        for queue in ("gpu", "cpu"):
            assert self.control("add_consumer", queue=queue), self.log_tail()

    def active(self) -> list[dict]:
        replies = self.control("active") or [{}]
        return next(iter(replies[0].values()), [])


@contextmanager
def running_worker(
    *, prefix: str, queues: Iterable[str], log_path: Path, env: dict[str, str], timeout: float = 180
) -> Iterator[LiveWorker]:
    """A worker named prefix-<random>@<host>, started and answering pings; stopped when the block ends."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    process = start_worker_process(name=name, queues=queues, log_path=log_path, env=env)
    try:
        wait_for_worker(process, name, log_path, timeout=timeout)
        yield LiveWorker(name=name, process=process, log_path=log_path)
    finally:
        stop_worker_process(process)
