"""The job's state table (jobs.services.transitions) is what the services do: each action, tried on a job in
every status, changes it exactly when the table says it may, and into the status the table names."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from jobs.inputs import JobInput
from jobs.models import Job
from jobs.services import lifecycle, recovery, submissions
from jobs.services.errors import JobStateError
from jobs.services.transitions import TRANSITIONS, Action, may

pytestmark = pytest.mark.django_db

Status = Job.Status


def test_every_status_is_reached_and_an_ended_job_never_changes_status():
    targets = {move.target for move in TRANSITIONS.values()}
    assert set(Status.values) <= targets
    for action, move in TRANSITIONS.items():
        if move.target is not None:
            assert not move.sources & Job.TERMINAL, f"{action} moves an ended job"


def _refused(call: Callable[[], object]) -> bool:
    """True when the service refused: it answered None or False, or raised JobStateError."""
    try:
        return call() in (None, False)
    except JobStateError:
        return True


def _delete(job: Job) -> bool:
    lifecycle.job_delete(job=job)  # answers nothing; refuses with JobStateError
    return True


# Each action through the service that performs it, on a job whose current task id is the run's or message's.
SERVICES: dict[Action, Callable[[Job], object]] = {
    Action.START: lambda job: lifecycle.job_start(job_id=job.pk, task_id=job.celery_task_id, worker="w"),
    Action.PROGRESS: lambda job: lifecycle.job_record_progress(job_id=job.pk, task_id=job.celery_task_id, percent=5),
    Action.FINISH: lambda job: lifecycle.job_finish(
        job_id=job.pk, task_id=job.celery_task_id, results={}, manifest={}, artifacts_path="jobs/x"
    ),
    Action.FAIL: lambda job: lifecycle.job_fail(job_id=job.pk, task_id=job.celery_task_id, error="boom"),
    Action.REQUEUE: lambda job: recovery.job_worker_lost(job_id=job.pk, task_id=job.celery_task_id, reason="died"),
    Action.RESEND: lambda job: lifecycle.job_set_priority(job=job, priority=7),
    Action.CANCEL: lambda job: lifecycle.job_cancel(job=job),
    Action.RETRY: lambda job: submissions.job_retry(job=job),
    Action.DELETE: _delete,
}


@pytest.mark.parametrize("action", list(SERVICES), ids=str)
def test_each_action_moves_exactly_the_jobs_the_table_allows(action, user, make_job):
    for status in Status.values:
        job = make_job(user, status=status)
        refused = _refused(lambda job=job: SERVICES[action](job))
        after = Job.objects.filter(pk=job.pk).values_list("status", flat=True).first()
        if may(action, status):
            target = TRANSITIONS[action].target
            expected = None if action == Action.DELETE else (target or status)
            assert not refused and after == expected, f"{action} on a {status} job"
        else:
            assert refused and after == status, f"{action} on a {status} job"


def test_a_submitted_job_starts_queued(user):
    submission = submissions.job_submit(owner=user, data=JobInput(preset="fp8-dynamic", calibration_kind="none"))
    assert submission.created and submission.job.status == TRANSITIONS[Action.SUBMIT].target == Status.QUEUED
