"""Redis itself fails: restarted (with its append-only file, as docker-compose runs it) and flushed, with
jobs queued and one running. Nothing is lost or run twice: the database is the truth, and the sweeper
sends queued jobs whose message is gone again. Meanwhile the pages and the API keep answering.

These run against a private redis-server on a free port: the shared one is never restarted or flushed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from jobs.models import Job
from jobs.services import broker, recovery
from tests.faults.conftest import freeze
from tests.faults.test_worker_faults import _wait_running, _wait_status
from tests.support import wait_until

pytestmark = pytest.mark.slow


@dataclass
class PrivateRedis:
    port: int
    folder: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, timeout=30, what=f"redis-server on port {self.port}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)

    def answers(self) -> bool:
        try:
            return redis.Redis(port=self.port, socket_timeout=1).ping()
        except redis.ConnectionError:
            return False

    def flushall(self) -> None:
        redis.Redis(port=self.port).flushall()


@pytest.fixture
def private_redis(tmp_path) -> Iterator[PrivateRedis]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = PrivateRedis(port=port, folder=tmp_path)
    server.start()
    yield server
    if server.process.poll() is None:
        server.stop()


@contextmanager
def broker_of_this_process(url: str) -> Iterator[None]:
    """Point the test process's Celery app (publishing, control, the sweeper) at another broker."""
    from compressor_app.celery import app

    def reset_pools() -> None:  # kombu keeps one pool per broker URL: the next use picks the URL's own
        app._pool = None
        app.amqp._producer_pool = None

    previous = app.conf.broker_url
    app.conf.broker_url = url
    reset_pools()
    try:
        yield
    finally:
        app.conf.broker_url = previous
        reset_pools()


def _hold(worker) -> int:
    """Freeze the running job's process (SIGSTOP), so that it is mid-run for as long as the test needs."""
    pid = worker.child_pid()
    freeze(pid)
    return pid


def _unacknowledged_for_s(task_id: str) -> float:
    """How long ago, by Redis's record, a worker took task_id's message without acknowledging it yet (0 while it
    waits or is done): what a worker compares with its visibility timeout before it hands the message out again."""
    from compressor_app.celery import app

    with app.connection_for_read() as conn:
        channel = conn.default_channel
        prefix = getattr(channel, "global_keyprefix", "")  # kombu does not prefix HGETALL and ZSCORE itself
        for tag, raw in channel.client.hgetall(prefix + channel.unacked_key).items():
            if json.loads(raw)[0]["headers"]["id"] == task_id:
                delivered = channel.client.zscore(prefix + channel.unacked_index_key, tag)
                return time.time() - delivered if delivered is not None else 0.0
    return 0.0


def _runs(job) -> int:
    return Job.objects.get(pk=job.pk).log_lines.filter(text__startswith="Started on").count()


def test_redis_restarted_then_flushed_loses_no_job_and_runs_none_twice(
    private_redis, start_worker, owner, queue_job, api_for, client, transactional_db
):
    api = api_for(owner)
    client.force_login(owner)
    with broker_of_this_process(private_redis.url):
        worker = start_worker(broker_url=private_redis.url)

        # Given one running job (held mid-run) and three queued behind it
        running = queue_job(owner)
        queued = [queue_job(owner) for _ in range(2)]
        doomed = queue_job(owner)
        _wait_running(running, worker)
        held = _hold(worker)

        # When Redis goes down
        private_redis.stop()

        # Then the API and the pages keep answering; a new job is kept, with a clear message
        response = api.post("/api/v1/jobs/", {"preset": "fp8-dynamic", "calibration": {"kind": "none"}}, format="json")
        assert response.status_code == 201, response.content
        kept = response.json()
        assert kept["status"] == "queued" and kept["message"] == broker.QUEUE_UNREACHABLE
        assert api.get(f"/api/v1/jobs/{kept['id']}/").json()["message"] == broker.QUEUE_UNREACHABLE
        assert client.get("/").status_code == 200
        page = client.get(f"/jobs/{kept['id']}/")
        assert page.status_code == 200 and "queue is unreachable" in page.content.decode()
        assert api.get(f"/api/v1/jobs/{running.pk}/").json()["status"] == "running"
        # ...and a queued job can still be cancelled
        assert api.post(f"/api/v1/jobs/{doomed.pk}/cancel/").json()["status"] == "cancelled"

        # When Redis is back (from its append-only file) and the held job goes on
        private_redis.start()
        os.kill(held, signal.SIGCONT)

        # Then every job runs to success exactly once, and the kept one is sent by the sweeper
        for job in [running, *queued]:
            assert _wait_status(job, "succeeded", "failed").status == "succeeded"
        assert recovery.job_sweep_stranded(older_than_s=0) == [kept["id"]]
        assert Job.objects.get(pk=kept["id"]).celery_task_id in broker.broker_task_ids(queues={"gpu"})

        # Given again one running job (held) and two queued
        running2 = queue_job(owner)
        queued2 = [queue_job(owner) for _ in range(2)]
        _wait_running(running2, worker)
        held = _hold(worker)

        # When Redis loses all its data
        private_redis.flushall()
        os.kill(held, signal.SIGCONT)

        # Then the sweeper sends the queued jobs again (the running one is left alone)...
        assert sorted(recovery.job_sweep_stranded(older_than_s=0)) == sorted([kept["id"]] + [j.pk for j in queued2])
        # ...and every job runs to success exactly once
        for job in [running2, *queued2]:
            assert _wait_status(job, "succeeded", "failed").status == "succeeded"
        for job in [running, *queued, running2, *queued2]:
            assert _runs(job) == 1, f"job {job.pk} ran {_runs(job)} times"
        doomed.refresh_from_db()
        assert doomed.status == "cancelled" and doomed.started_at is None
        assert recovery.job_sweep_stranded(older_than_s=0) == []
        worker.stop()


def test_a_job_delivered_twice_runs_once_and_leaves_one_checkpoint(
    fault_worker, start_worker, owner, queue_job, media_root, builtin_model
):
    # Given a job that has run on one worker for longer than a second worker's visibility timeout (2 s),
    # held mid-run (SIGSTOP) so that it cannot end, and acknowledge its message, before that worker is up
    job = queue_job(owner, model_source="smollm2-135m-instruct")
    _wait_running(job, fault_worker)
    held = _hold(fault_worker)
    wait_until(
        lambda: _unacknowledged_for_s(job.celery_task_id) > 2.5,
        timeout=60,
        what="Redis to record the message as delivered for longer than 2.5 s",
    )

    # When that second worker starts, Redis hands it the message again (it looks abandoned: the worker
    # restores unacknowledged messages older than its visibility timeout as it starts polling)
    impatient = start_worker(
        COMPRESSOR_VISIBILITY_TIMEOUT_S="2",
        COMPRESSOR_JOB_SOFT_LIMIT_S="1",  # its settings insist on limits below the visibility timeout
        COMPRESSOR_JOB_HARD_LIMIT_S="1",
        COMPRESSOR_WORKER_PRELOAD="false",
    )
    received = f"jobs.compress[{job.celery_task_id}] received"
    try:
        wait_until(
            lambda: received in impatient.log_path.read_text(errors="replace"),
            timeout=60,
            what="the second worker to receive the same message",
        )
    finally:
        os.kill(held, signal.SIGCONT)

    # Then the job runs to success exactly once, with exactly one checkpoint
    done = _wait_status(job, "succeeded", "failed")
    assert done.status == "succeeded" and done.worker == fault_worker.name, done.error
    assert _runs(job) == 1
    folder = Path(media_root) / "jobs" / str(job.pk)
    assert [p.name for p in folder.iterdir()] == ["checkpoint"]
    assert received in fault_worker.log_path.read_text(errors="replace"), "the first delivery"
