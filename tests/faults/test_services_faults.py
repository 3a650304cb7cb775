"""The state rules behind the fault tests, checked directly on the services (fast, no worker)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from jobs.models import Job
from jobs.services import broker, lifecycle, recovery, retention


def test_a_stale_run_cannot_write_into_finish_or_fail_the_next_run(owner, make_job, settings, db):
    # Given a run that went silent and was re-queued by the reaper, and the job's next run
    settings.COMPRESSOR_HEARTBEAT_TIMEOUT_S = 60
    job = make_job(owner)
    stale_run = job.celery_task_id
    assert lifecycle.job_start(job_id=job.pk, task_id=stale_run, worker="w1")
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(minutes=5))
    assert recovery.job_reap_stale() == [(job.pk, "requeued")]
    next_run = Job.objects.get(pk=job.pk).celery_task_id
    assert lifecycle.job_start(job_id=job.pk, task_id=next_run, worker="w2")

    # When the stale run wakes up and reports, finishes or fails
    wrote = lifecycle.job_record_progress(job_id=job.pk, task_id=stale_run, stage="saving", percent=90.0)
    finished = lifecycle.job_finish(job_id=job.pk, task_id=stale_run, results={}, manifest={}, artifacts_path="x")
    failed = lifecycle.job_fail(job_id=job.pk, task_id=stale_run, error="late")

    # Then none of it lands: the next run owns the job, and its own writes still work
    assert (wrote, finished, failed) == (False, False, False)
    current = Job.objects.get(pk=job.pk)
    assert current.status == "running" and current.worker == "w2" and current.stage == "preparing"
    assert lifecycle.job_record_progress(job_id=job.pk, task_id=next_run, stage="calibrating")


def test_a_dead_worker_process_requeues_once_then_fails_with_worker_lost(owner, make_job, db):
    job = make_job(owner)
    lifecycle.job_start(job_id=job.pk, task_id=job.celery_task_id, worker="w1")
    assert recovery.job_worker_lost(job_id=job.pk, task_id=job.celery_task_id, reason="process died") == "requeued"
    job.refresh_from_db()
    assert job.status == "queued" and job.requeue_count == 1
    lifecycle.job_start(job_id=job.pk, task_id=job.celery_task_id, worker="w2")
    assert recovery.job_worker_lost(job_id=job.pk, task_id=job.celery_task_id, reason="process died") == "failed"
    job.refresh_from_db()
    assert job.status == "failed" and "Worker lost: the worker w2 process died" in job.error
    assert "attempt 2 of 2" in job.error
    # a late report of the same death changes nothing
    assert recovery.job_worker_lost(job_id=job.pk, task_id=job.celery_task_id, reason="process died") is None


def test_the_sweeper_sends_again_only_queued_jobs_whose_message_is_gone(owner, make_job, transactional_db):
    from jobs.tasks import compress_job

    # Given a queued job whose message is in Redis, one whose message never got there, and a cancelled one
    sent = make_job(owner, queue="sweep-test")
    compress_job.apply_async(args=(sent.pk,), task_id=sent.celery_task_id, queue=sent.queue)
    lost = make_job(owner, queue="sweep-test")
    cancelled = make_job(owner, queue="sweep-test", status="cancelled")

    # When the sweeper runs, only the lost one is sent again, with a new message
    assert recovery.job_sweep_stranded(older_than_s=0) == [lost.pk]
    lost_now = Job.objects.get(pk=lost.pk)
    assert lost_now.celery_task_id != lost.celery_task_id
    assert {sent.celery_task_id, lost_now.celery_task_id} <= broker.broker_task_ids(queues={"sweep-test"})
    assert Job.objects.get(pk=cancelled.pk).status == "cancelled"
    # ...and a second sweep finds nothing to do
    assert recovery.job_sweep_stranded(older_than_s=0) == []

    from compressor_app.celery import app

    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge("sweep-test")


def test_housekeeping_removes_temporary_folders_of_runs_that_are_over_only(owner, make_job, media_root, db):
    running = make_job(owner, status="running")
    failed = make_job(owner, status="failed")
    folders = {}
    for job in (running, failed):
        folder = Path(media_root) / "jobs" / str(job.pk) / ".checkpoint.partial-abc123"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
        folders[job.pk] = folder

    removed = retention.job_remove_stale_partials()
    assert folders[failed.pk] in removed and folders[running.pk] not in removed
    assert folders[running.pk].is_dir() and not folders[failed.pk].exists()


def test_evaluation_progress_stops_the_engine_once_the_soft_limit_has_passed():
    # Evaluation reports only through this callback, and lm-eval's broad `except Exception` may have
    # swallowed Celery's SoftTimeLimitExceeded: the next report stops the run all the same.
    from engine.errors import CancelledError
    from engine.spec import ProgressEvent
    from jobs.progress import JobProgress

    progress = JobProgress(job_id=1, task_id="run-1", interval_s=1.0)
    progress(ProgressEvent(stage="evaluating", step=1, total=2, message="baseline"))
    progress.time_is_up()
    progress(ProgressEvent(stage="evaluating", log_line="a log line still passes"))
    with pytest.raises(CancelledError):
        progress(ProgressEvent(stage="evaluating", step=2, total=2, message="compressed"))
    assert progress.out_of_time and progress.should_cancel()
