"""jobs.services: the state machine, deduplication, the reaper and the log (database only, no worker)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
from django.utils import timezone

from engine.errors import PreflightError
from jobs import dispatch
from jobs.inputs import JobInput
from jobs.models import CalibrationDataset, Job, JobLogLine
from jobs.services import lifecycle, recovery, storage, submissions
from jobs.services.errors import JobStateError

pytestmark = pytest.mark.django_db

FP8 = JobInput(preset="fp8-dynamic", calibration_kind="none")


def test_an_upload_deleted_while_its_job_is_checked_refuses_the_job_in_words(user):
    # Given an upload of the user's, named by a request, then deleted before the job is recorded
    from django.core.files.uploadedfile import SimpleUploadedFile

    rows = SimpleUploadedFile("calib.jsonl", b'{"text": "a row of calibration text"}\n' * 40)
    dataset = storage.calibration_dataset_create(owner=user, name="calib", upload=rows)
    data = JobInput(preset="int8-w8a8-gptq", calibration_kind="upload", calibration_file=dataset)
    storage.calibration_dataset_delete(dataset=CalibrationDataset.objects.get(pk=dataset.pk))  # another request's

    # When the request is submitted, then it is refused naming the calibration, and no job is recorded
    with pytest.raises(PreflightError, match="deleted") as refused:
        submissions.job_submit(owner=user, data=data)
    assert refused.value.field == "calibration" and not Job.objects.exists()


def test_submit_queues_the_job_after_commit_with_its_broker_priority(user, django_capture_on_commit_callbacks):
    # Given a request for the data-free preset with a high priority (above the users' cap: an operator's)
    user.is_staff = True
    data = JobInput(preset="fp8-dynamic", calibration_kind="none", priority=8)

    # When it is submitted
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        submission = submissions.job_submit(owner=user, data=data)

    # Then a queued job with its resolved recipe exists and one enqueue waits for the commit
    job = submission.job
    assert submission.created and job.status == Job.Status.QUEUED
    assert "QuantizationModifier" in job.resolved_recipe and job.spec_fingerprint
    assert job.queue == "gpu" and job.celery_task_id
    assert len(callbacks) == 1

    # ...and once it commits, Redis holds the compress message for this job on the list of broker priority 1
    # (Redis polls 0 first: a job's 9 runs first), where a worker of its queue will take it
    with _consumers_paused(job.queue):
        callbacks[0]()
        key, message = _waiting_message(job.celery_task_id, job.queue)
    assert key == f"{job.queue}:1" and message["properties"]["priority"] == 1
    assert message["headers"]["task"] == dispatch.COMPRESS and message["headers"]["argsrepr"] == f"({job.pk},)"


@contextmanager
def _consumers_paused(queue: str) -> Iterator[None]:
    """The session's live worker (tests/jobs) stops taking this queue's messages meanwhile: the message the
    test reads stays in Redis."""
    from compressor_app.celery import app

    replies = app.control.cancel_consumer(queue, reply=True, timeout=1) or []
    try:
        yield
    finally:
        if names := [name for reply in replies for name in reply]:
            app.control.add_consumer(queue, destination=names, reply=True, timeout=5)


def _waiting_message(task_id: str, queue: str) -> tuple[str, dict]:
    """(the Redis list, the message) of the waiting message task_id, taken out of Redis (the test's job rolls
    back; nobody must run it)."""
    from compressor_app.celery import app

    with app.connection_for_write() as conn:
        channel = conn.default_channel
        prefix = getattr(channel, "global_keyprefix", "")  # kombu does not prefix LRANGE and LREM itself
        for key in sorted({channel._q_for_pri(queue, step) for step in channel.priority_steps}):
            for raw in channel.client.lrange(prefix + key, 0, -1):
                message = json.loads(raw)
                if message["headers"]["id"] == task_id:
                    channel.client.lrem(prefix + key, 1, raw)
                    return key, message
    raise AssertionError(f"No message for task {task_id} waits in Redis")


def test_submit_refuses_a_job_preflight_rejects(user):
    # Given a preset that needs calibration data, without any
    data = JobInput(preset="int8-w8a8-gptq", calibration_kind="none")

    # When / Then: refused before it takes a queue place, naming the calibration
    with pytest.raises(PreflightError) as error:
        submissions.job_submit(owner=user, data=data)
    assert error.value.field == "calibration"
    assert not Job.objects.exists()


def test_submit_refuses_local_model_folders_unless_allowed(user, settings, tmp_path):
    settings.COMPRESSOR_ALLOW_LOCAL_PATHS = False
    with pytest.raises(PreflightError) as error:
        submissions.job_submit(owner=user, data=JobInput(model=str(tmp_path), preset="fp8-dynamic"))
    assert error.value.field == "model"


def test_identical_work_of_the_same_user_returns_the_succeeded_job(user, other_user):
    # Given a succeeded job
    first = submissions.job_submit(owner=user, data=FP8).job
    Job.objects.filter(pk=first.pk).update(status=Job.Status.SUCCEEDED, finished_at=timezone.now())

    # When the same user submits the same work again
    again = submissions.job_submit(owner=user, data=FP8)

    # Then the earlier result is offered and nothing new is queued
    assert not again.created and again.job.pk == first.pk
    # ...but a different priority is still the same work, force runs it anyway, and other users are separate
    assert not submissions.job_submit(owner=user, data=JobInput(preset="fp8-dynamic", priority=1)).created
    assert submissions.job_submit(owner=user, data=FP8, force=True).created
    assert submissions.job_submit(owner=other_user, data=FP8).created
    # ...and different calibration data is different work
    gptq_a = JobInput(preset="int8-w8a8-gptq", calibration_samples=8, calibration_max_seq_len=128)
    gptq_b = JobInput(preset="int8-w8a8-gptq", calibration_samples=16, calibration_max_seq_len=128)
    a = submissions.job_submit(owner=user, data=gptq_a).job
    assert a.spec_fingerprint != submissions.job_submit(owner=user, data=gptq_b).job.spec_fingerprint


def test_start_claims_a_queued_job_once_and_only_for_its_own_task(user, make_job):
    job = make_job(user)

    assert lifecycle.job_start(job_id=job.pk, task_id="some-other-task", worker="w1") is None
    started = lifecycle.job_start(job_id=job.pk, task_id=job.celery_task_id, worker="w1")
    assert started.status == Job.Status.RUNNING and started.worker == "w1" and started.started_at
    # a second delivery of the same message finds it running and does nothing
    assert lifecycle.job_start(job_id=job.pk, task_id=job.celery_task_id, worker="w2") is None
    assert Job.objects.get(pk=job.pk).worker == "w1"


def test_a_late_progress_message_after_cancel_changes_nothing(user, make_job):
    # Given a running job that is then cancelled
    job = make_job(user)
    lifecycle.job_start(job_id=job.pk, task_id=job.celery_task_id, worker="w1")
    run = job.celery_task_id
    assert lifecycle.job_record_progress(
        job_id=job.pk, task_id=run, stage="calibrating", step=3, total=30, percent=12.0
    )
    lifecycle.job_cancel(job=job, by=user)
    before = Job.objects.get(pk=job.pk)
    lines_before = JobLogLine.objects.filter(job=job).count()

    # When the killed worker's late messages arrive
    recorded = lifecycle.job_record_progress(
        job_id=job.pk, task_id=run, stage="saving", step=1, total=1, percent=90.0, log_lines=[("saving", "late line")]
    )
    finished = lifecycle.job_finish(
        job_id=job.pk, task_id=run, results={"x": 1}, manifest={"files": []}, artifacts_path="x"
    )
    failed = lifecycle.job_fail(job_id=job.pk, task_id=run, error="late failure")

    # Then the job stays cancelled exactly as it was
    after = Job.objects.get(pk=job.pk)
    assert (recorded, finished, failed) == (False, False, False)
    assert after.status == Job.Status.CANCELLED
    assert (after.stage, after.step, after.percent, after.results, after.error) == (
        before.stage, before.step, before.percent, None, ""
    )  # fmt: skip
    assert JobLogLine.objects.filter(job=job).count() == lines_before


def test_cancel_a_finished_job_is_refused(user, make_job):
    job = make_job(user, status=Job.Status.SUCCEEDED)
    with pytest.raises(JobStateError):
        lifecycle.job_cancel(job=job)


def test_retry_links_a_new_job_to_the_failed_one(user, make_job):
    failed = make_job(user, status=Job.Status.FAILED, error="boom", attempt=1)

    retry = submissions.job_retry(job=failed)

    assert retry.pk != failed.pk and retry.retry_of_id == failed.pk and retry.attempt == 2
    assert retry.status == Job.Status.QUEUED and retry.preset == failed.preset
    with pytest.raises(JobStateError):
        submissions.job_retry(job=retry)  # a queued job is not retried


def test_clone_and_edit_creates_a_linked_job_with_changes(user, make_job):
    old = make_job(user, status=Job.Status.SUCCEEDED)
    edited = dataclasses.replace(JobInput.from_job(old), preset="int8-w8a8-gptq", calibration_kind="builtin")
    clone = submissions.job_clone(job=old, owner=user, data=edited)
    assert clone.created and clone.job.retry_of_id == old.pk and clone.job.preset == "int8-w8a8-gptq"


def test_changing_priority_gives_a_queued_job_a_new_message(user, make_job, django_capture_on_commit_callbacks):
    job = make_job(user, priority=2)
    old_task = job.celery_task_id
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert lifecycle.job_set_priority(job=job, priority=9)
    job.refresh_from_db()
    assert job.priority == 9 and job.celery_task_id != old_task and len(callbacks) == 1
    # the old message, should it arrive, claims nothing
    assert lifecycle.job_start(job_id=job.pk, task_id=old_task, worker="w") is None
    running = make_job(user, status=Job.Status.RUNNING)
    assert not lifecycle.job_set_priority(job=running, priority=9)


def test_reaper_requeues_a_silent_job_once_then_fails_it(user, make_job, settings, django_capture_on_commit_callbacks):
    # Given a running job whose worker stopped sending heartbeats
    settings.COMPRESSOR_HEARTBEAT_TIMEOUT_S = 60
    old = timezone.now() - timedelta(minutes=5)
    job = make_job(user, status=Job.Status.RUNNING, started_at=old, heartbeat_at=old, worker="w-gone")
    fresh = make_job(user, status=Job.Status.RUNNING, started_at=old, heartbeat_at=timezone.now())

    # When the reaper runs, the silent job goes back to the queue once (with a new message)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert recovery.job_reap_stale() == [(job.pk, "requeued")]
    job.refresh_from_db()
    assert job.status == Job.Status.QUEUED and job.requeue_count == 1 and len(callbacks) == 1
    assert Job.objects.get(pk=fresh.pk).status == Job.Status.RUNNING

    # When it goes silent again, it fails with the reason in plain words
    lifecycle.job_start(job_id=job.pk, task_id=job.celery_task_id, worker="w2")
    Job.objects.filter(pk=job.pk).update(heartbeat_at=old)
    assert recovery.job_reap_stale() == [(job.pk, "failed")]
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED and "stopped answering" in job.error and "w2" in job.error


def test_the_log_keeps_only_the_newest_lines(user, make_job, settings):
    settings.COMPRESSOR_JOB_LOG_MAX_LINES = 5
    job = make_job(user, status=Job.Status.RUNNING)
    for i in range(12):
        lifecycle.job_record_progress(
            job_id=job.pk, task_id=job.celery_task_id, log_lines=[("calibrating", f"line {i}")]
        )
    texts = list(JobLogLine.objects.filter(job=job).values_list("text", flat=True))
    assert texts == [f"line {i}" for i in range(7, 12)]
