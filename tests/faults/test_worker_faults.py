"""Faults of the worker itself, caused for real: its child or the whole worker SIGKILLed mid-job, the
time limits, out of memory, and a kill in the middle of writing the checkpoint.

Bounds stated here (and asserted): a dead child is noticed at once by the worker's main process; a
dead worker within the heartbeat timeout (HEARTBEAT_TIMEOUT_S, 6 s here; 120 s by default) by the reaper.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from engine.artifacts import verify_manifest
from jobs.models import Job
from jobs.services import retention
from tests.faults.conftest import HEARTBEAT_TIMEOUT_S, job_dir, leftovers
from tests.support import wait_until

pytestmark = pytest.mark.slow


def _wait_status(job, *statuses, timeout=180):
    return wait_until(
        lambda: (j := Job.objects.get(pk=job.pk)).status in statuses and j,
        timeout=timeout,
        what=f"job {job.pk} to become {' or '.join(statuses)}",
    )


def _wait_running(job, worker, stage: str | None = None, timeout=180):
    """Until the job runs (in the given stage); fails early if it ended instead."""

    def running():
        current = Job.objects.get(pk=job.pk)
        if current.is_terminal:
            raise AssertionError(f"job {job.pk} ended ({current.status}: {current.error}) before {stage or 'running'}")
        return current.status == "running" and (stage is None or current.stage == stage) and current

    return wait_until(running, timeout=timeout, interval=0.05, what=f"job {job.pk} to run ({stage or 'any stage'})")


def _kill_child(worker) -> int:
    pid = worker.child_pid()
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_job_whose_worker_child_dies_every_time_is_requeued_once_then_failed(
    fault_worker, owner, queue_job, media_root
):
    # Given a running job (its child is still importing the engine or loading the model)
    job = queue_job(owner)
    _wait_running(job, fault_worker)

    # When its worker child is SIGKILLed
    first_child = _kill_child(fault_worker)

    # Then the worker's main process notices at once: the job is back in the queue, attempt 2, new message
    started = time.monotonic()
    requeued = wait_until(
        lambda: (j := Job.objects.get(pk=job.pk)).requeue_count == 1 and j,
        timeout=HEARTBEAT_TIMEOUT_S,
        what="the job to be re-queued after its child died",
    )
    assert requeued.celery_task_id != job.celery_task_id, "a new message, so the old one claims nothing"
    assert time.monotonic() - started < HEARTBEAT_TIMEOUT_S

    # When the second run's child dies too
    _wait_running(job, fault_worker)
    assert fault_worker.child_pid() != first_child, "the second run got a new child"
    _kill_child(fault_worker)

    # Then the job fails with "worker lost" after 2 attempts and is not re-queued again
    failed = _wait_status(job, "failed", timeout=HEARTBEAT_TIMEOUT_S * 2)
    assert "Worker lost" in failed.error and "attempt 2 of 2" in failed.error, failed.error
    assert failed.requeue_count == 1 and not failed.artifacts_path and not failed.manifest
    # ...nothing stays running, no checkpoint is offered, and housekeeping leaves no partial folder
    retention.job_remove_stale_partials()
    assert leftovers(media_root, job) in ([], ["checkpoint"]) and not (job_dir(media_root, job) / "checkpoint").exists()
    assert not Job.objects.filter(status="running").exists()
    # ...and the worker takes the next job
    nxt = queue_job(owner)
    assert _wait_status(nxt, "succeeded", "failed").status == "succeeded"


def test_a_job_whose_whole_worker_died_is_requeued_by_the_reaper_and_runs_once(
    start_worker, fault_worker, owner, queue_job, reap, media_root
):
    # Given a running job
    job = queue_job(owner)
    _wait_running(job, fault_worker)

    # When the whole worker (main process and child) is SIGKILLed
    fault_worker.kill()

    # Then, within the heartbeat timeout, the reaper puts the job back in the queue (attempt 2)
    started = time.monotonic()
    wait_until(
        lambda: (job.pk, "requeued") in reap(),
        timeout=HEARTBEAT_TIMEOUT_S * 3,
        what="the reaper to re-queue the job of the dead worker",
    )
    assert time.monotonic() - started < HEARTBEAT_TIMEOUT_S * 3
    assert Job.objects.get(pk=job.pk).status == "queued"

    # When a worker is back, the job runs to success once, with one complete checkpoint
    start_worker()
    done = _wait_status(job, "succeeded", "failed")
    assert done.status == "succeeded" and done.requeue_count == 1, done.error
    folder = job_dir(media_root, job)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint"]
    assert verify_manifest(folder / "checkpoint") == []
    started_lines = done.log_lines.filter(text__startswith="Started on").count()
    assert started_lines == 2, "one start per attempt, never two runs of one attempt"
