"""Fixtures for the fault tests: real worker processes with short heartbeats on a queue of their own,
jobs on the tiny model, and what lets a test kill, limit or starve those processes for real.

The fault workers consume only the "faults" queue, so the session's ordinary live worker (tests/jobs)
never takes their jobs. Nothing is mocked: the faults are signals, limits, mounts and Redis itself.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.jobs.conftest import api_for, checkpoint  # noqa: F401 - fixtures shared with tests/jobs
from tests.support import LiveWorker, start_worker_process, wait_until, worker_env

FAULT_QUEUE = "faults"
# The worker writes its progress once per heartbeat, so a stage shorter than one goes unrecorded: loading the
# built-in model takes about 0.4 s on a fast machine, and the cancel-in-each-stage test must see it running.
HEARTBEAT_S = 0.2
HEARTBEAT_TIMEOUT_S = 6  # what the tests' reaper calls use: a silent job is reaped after this
BUILTIN = "smollm2-135m-instruct"
# A GPTQ job on the built-in model: its calibrating stage lasts tens of seconds (minutes on a loaded machine).
GPTQ = {
    "preset": "int8-w8a8-gptq",
    "calibration_kind": "builtin",
    "calibration_samples": 8,
    "calibration_max_seq_len": 128,
}
# A static FP8 job on the built-in model: a calibrating stage of a few seconds (observers only, no Hessians).
STATIC_FP8 = {**GPTQ, "preset": "fp8-static"}


class FaultWorker(LiveWorker):
    """A LiveWorker that also knows its processes: the main one and its pool child."""

    def child_pids(self) -> list[int]:
        return [child.pid for child in psutil.Process(self.process.pid).children()]

    def child_pid(self) -> int:
        return wait_until(lambda: (self.child_pids() or [None])[0], timeout=60, what=f"a pool child of {self.name}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL the whole worker: the main process and its child, with no chance to clean up."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="session")
def launch_worker(
    django_db_setup, broker, media_root, hub_server, tmp_path_factory
) -> Iterator[Callable[..., FaultWorker]]:
    """launch_worker(queue=..., broker_url=..., **env): a `celery worker` process; all are stopped at the end
    of the session. Tests use start_worker, whose workers end with the test."""
    from django.db import connection

    started: list[FaultWorker] = []

    def start(*, queue: str = FAULT_QUEUE, broker_url: str | None = None, **env: str) -> FaultWorker:
        name = f"fault-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        log_path = tmp_path_factory.mktemp("fault-worker") / "worker.log"
        settings = {
            "COMPRESSOR_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
            "COMPRESSOR_CANCEL_GRACE_S": "5",
            # The fault jobs run the tiny model from a server folder, as an operator who allows them would.
            "COMPRESSOR_ALLOW_LOCAL_PATHS": "True",
            **hub_server.env,  # the session's local hub (tests/hub_server.py) is the workers' Hugging Face hub
            **({"CELERY_BROKER_URL": broker_url} if broker_url else {}),
            **env,  # the test's own settings win
        }
        environment = worker_env(
            settings_dict=connection.settings_dict, broker=broker, media_root=media_root, **settings
        )
        process = start_worker_process(name=name, queues=[queue], log_path=log_path, env=environment)
        worker = FaultWorker(name=name, process=process, log_path=log_path)
        started.append(worker)
        wait_until_ready(worker, broker_url)
        return worker

    def wait_until_ready(worker: FaultWorker, broker_url: str | None) -> None:
        from compressor_app.celery import app

        def ready() -> bool:
            if not worker.alive():
                raise AssertionError(f"The worker exited:\n{worker.log_tail()}")
            if broker_url:  # a private Redis: the test process's app talks to the session's one
                return f"{worker.name} ready" in worker.log_path.read_text(errors="replace")
            return bool(app.control.ping(destination=[worker.name], timeout=1))

        wait_until(ready, timeout=120, what=f"the worker {worker.name} to answer")

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def start_worker(launch_worker) -> Iterator[Callable[..., FaultWorker]]:
    """start_worker(**like launch_worker): a worker of this test's own, stopped when the test ends (failed
    or not), so that it never takes the jobs of a later test."""
    started: list[FaultWorker] = []

    def start(**options) -> FaultWorker:
        worker = launch_worker(**options)
        started.append(worker)
        return worker

    yield start
    for worker in reversed(started):
        worker.stop()


@pytest.fixture(scope="session")
def shared_fault_worker() -> dict[str, FaultWorker | None]:
    """The fault tests' shared worker (short heartbeat, normal limits), kept from test to test."""
    return {"worker": None}


@pytest.fixture(scope="session")
def light_worker(launch_worker) -> FaultWorker:
    """A light worker (housekeeping queue): it runs the cancel fallback that terminates a run."""
    return launch_worker(queue="light", COMPRESSOR_WORKER_PRELOAD="false")


@pytest.fixture
def fault_worker(launch_worker, shared_fault_worker, transactional_db) -> Iterator[FaultWorker]:
    """The shared fault worker, alive (a test that killed it gets a new one for itself and the next tests),
    the only consumer of the fault queue while the test runs, idle afterwards."""
    worker = shared_fault_worker["worker"]
    if worker is None or not worker.alive():
        worker = shared_fault_worker["worker"] = launch_worker()
    yield worker
    if worker.alive():
        wait_until(lambda: not worker.active(), timeout=120, what="the fault worker to finish its task")
    from compressor_app.celery import app

    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge(FAULT_QUEUE)


@pytest.fixture
def owner(make_user):
    return make_user()


@pytest.fixture
def queue_job(make_job, tiny_model_dir) -> Callable[..., object]:
    """queue_job(owner, **fields, limits=...): a queued job (tiny model, fp8-dynamic) and its message.

    `soft_time_limit` / `time_limit` go on the message, as Celery allows per message.
    """
    from jobs.tasks import compress_job

    def queue(owner, *, soft_time_limit: float | None = None, time_limit: float | None = None, **fields):
        defaults = {"model_source": str(tiny_model_dir), "queue": FAULT_QUEUE, "device_class": "cpu"}
        job = make_job(owner, **{**defaults, **fields})
        limits = {"soft_time_limit": soft_time_limit, "time_limit": time_limit}
        compress_job.apply_async(
            args=(job.pk,),
            task_id=job.celery_task_id,
            queue=job.queue,
            **{key: value for key, value in limits.items() if value is not None},
        )
        return job

    return queue


@pytest.fixture
def reap():
    """Run the reaper as the light worker's beat would, with the fault tests' short heartbeat timeout."""
    from django.test import override_settings

    from jobs.services import recovery

    def run() -> list[tuple[int, str]]:
        with override_settings(COMPRESSOR_HEARTBEAT_TIMEOUT_S=HEARTBEAT_TIMEOUT_S):
            return recovery.job_reap_stale()

    return run


def freeze(pid: int) -> None:
    """SIGSTOP a worker child, as if it hung, at a moment it holds no SQLite write lock.

    A process stopped inside a write transaction would lock every other writer out of SQLite (on
    PostgreSQL it would lock only its row): stop, check that a write can begin, else let it go on a little.
    """
    from django.db import connection

    def write_locked() -> bool:
        if connection.vendor != "sqlite":
            return False
        probe = sqlite3.connect(connection.settings_dict["NAME"], timeout=0)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.rollback()
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            probe.close()

    for _attempt in range(100):
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.05)
        if not write_locked():
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(f"process {pid} kept holding the database's write lock")


def job_dir(media_root: Path, job) -> Path:
    return Path(media_root) / "jobs" / str(job.pk)


def leftovers(media_root: Path, job) -> list[str]:
    """Whatever a job left in its folder (temporary checkpoint folders included)."""
    folder = job_dir(media_root, job)
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
