"""A job's life after submission: the worker's side (claim, progress, finish, fail, discard a run's output)
and the owners' and operators' (cancel, delete, change the priority).

Every write of a run matches the job id, RUNNING and the run's own task id (with_task): a stalled run that the
reaper has re-queued (new task id) or that was cancelled can never write into, finish or fail the job's next
run.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from engine.units import duration_text
from jobs import dispatch
from jobs.dispatch import BROKER_ERRORS
from jobs.models import Job
from jobs.redaction import redact
from jobs.services import broker, job_log, storage
from jobs.services.errors import JobStateError
from jobs.services.transitions import Action, allowed, transition

logger = logging.getLogger(__name__)


# --- the worker's side ---------------------------------------------------------------------------------


def with_task(job_id: int, task_id: str) -> QuerySet[Job]:
    """The job's row while task_id is its current task (the message it waits for, or the run that claimed it);
    a transition adds the statuses its action acts on."""
    return Job.objects.filter(pk=job_id, celery_task_id=task_id)


def job_start(*, job_id: int, task_id: str, worker: str) -> Job | None:
    """Claim a queued job for this task. None: cancelled, claimed by someone else, or a stale message."""
    now = timezone.now()
    # The claim and its "Started on" line commit together: every run that started says so in its log, even
    # one whose process is frozen or killed right after the claim.
    with transaction.atomic():
        claimed = transition(
            with_task(job_id, task_id),
            Action.START,
            started_at=now,
            heartbeat_at=now,
            worker=worker,
            stage=Job.Stage.PREPARING,
            message="Starting",
            step=None,
            total=None,
            percent=0.0,
            error="",
        )
        if not claimed:
            return None
        job_log.job_log_append(job_id=job_id, lines=[(Job.Stage.PREPARING, f"Started on {worker}.")])
    return Job.objects.select_related("calibration_file").get(pk=job_id)


def job_record_progress(
    *,
    job_id: int,
    task_id: str,
    stage: str | None = None,
    step: int | None = None,
    total: int | None = None,
    percent: float | None = None,
    message: str | None = None,
    log_lines: list[tuple[str, str]] | None = None,
) -> bool:
    """Store progress, log lines and a heartbeat for this run of a job; False (and nothing stored) otherwise.

    False tells the worker to stop: the job was cancelled, ended, or handed to another run while it ran.
    """
    fields: dict[str, Any] = {"heartbeat_at": timezone.now()}
    if stage is not None:
        fields.update(stage=stage, step=step, total=total)
    if percent is not None:
        fields["percent"] = percent
    if message is not None:
        fields["message"] = redact(message)[:500]
    with transaction.atomic():
        # The UPDATE locks the row, so a concurrent cancel lands wholly before or after these lines.
        if not transition(with_task(job_id, task_id), Action.PROGRESS, **fields):
            return False
        if log_lines:
            job_log.job_log_append(job_id=job_id, lines=log_lines)
    return True


def job_finish(
    *, job_id: int, task_id: str, results: dict[str, Any], manifest: dict[str, Any], artifacts_path: str
) -> bool:
    """Running -> succeeded with results and the checkpoint; False if this run no longer owns the job."""
    with transaction.atomic():
        done = transition(
            with_task(job_id, task_id),
            Action.FINISH,
            finished_at=timezone.now(),
            stage=Job.Stage.DONE,
            percent=100.0,
            message="Checkpoint ready",
            results=results,
            manifest=manifest,
            artifacts_path=artifacts_path,
        )
        if done:
            job_log.job_log_append(
                job_id=job_id, lines=[(Job.Stage.DONE, "Succeeded: the checkpoint is ready to download.")]
            )
    return bool(done)


def job_fail(*, job_id: int, task_id: str, error: str, log_lines: list[tuple[str, str]] | None = None) -> bool:
    """Running -> failed with the reason in plain words; False if this run no longer owns the job."""
    return fail(with_task(job_id, task_id), job_id=job_id, error=error, log_lines=log_lines)


def fail(rows: QuerySet[Job], *, job_id: int, error: str, log_lines: list[tuple[str, str]] | None = None) -> bool:
    """Running -> failed for the job among rows (a run's, or the one the reaper saw), with the error redacted
    and logged; False if it was no longer running there."""
    with transaction.atomic():
        error = redact(error)
        done = transition(rows, Action.FAIL, finished_at=timezone.now(), error=error, message="Failed")
        if done:
            job_log.job_log_append(job_id=job_id, lines=[*(log_lines or []), ("", f"Failed: {error}")])
    return bool(done)


def job_discard_run_output(*, job_id: int, task_id: str, keep_resume: bool = False) -> None:
    """Remove a run's output unless a newer run of the job owns the folder now (the reaper re-queued it).

    keep_resume: keep the layers it compressed (jobs.resume_folders), for a retry of the failed job."""
    job = Job.objects.filter(pk=job_id).first()
    if job is not None and job.celery_task_id == task_id:
        storage.job_remove_artifacts(job=job, keep_resume=keep_resume)


def time_limit_error(limit_s: float) -> str:
    return f"The job ran into its time limit of {duration_text(limit_s)} and was stopped."


# --- operators and owners --------------------------------------------------------------------------------


def job_cancel(*, job: Job, by: AbstractBaseUser | None = None) -> Job:
    """Cancel a queued or running job.

    A queued job never starts (its task finds it cancelled and returns; the message is also revoked).
    A running job notices within about a second (its heartbeat update finds it no longer running), stops
    between steps and removes its partial output; if it has not stopped after COMPRESSOR_CANCEL_GRACE_S,
    a light task terminates its worker child (revoke with terminate=True) and removes the output.
    """
    who = f" by {by.get_username()}" if by is not None else ""
    with transaction.atomic():
        done = transition(
            Job.objects.filter(pk=job.pk), Action.CANCEL, finished_at=timezone.now(), message=f"Cancelled{who}"
        )
        if not done:
            job.refresh_from_db()
            raise JobStateError(f"Job {job.pk} has already {job.status}; it cannot be cancelled.")
        job_log.job_log_append(job_id=job.pk, lines=[("", f"Cancelled{who}.")])
        task_id = job.celery_task_id
        transaction.on_commit(lambda: _stop_after_cancel(job.pk, task_id))
    job.refresh_from_db()
    return job


def job_delete(*, job: Job) -> None:
    """Delete an ended job: its row, log lines and hub pushes, then its files once that commits (as retention
    does, so a crash in between leaves only files the orphan check removes). Refused with JobStateError while
    it is queued or running: cancel it first. Its checkpoint's bytes leave the owner's quota."""
    with transaction.atomic():
        deleted, _ = allowed(Job.objects.filter(pk=job.pk), Action.DELETE).delete()
        if not deleted:
            job.refresh_from_db()
            raise JobStateError(f"Job {job.pk} is {job.get_status_display().lower()}; cancel it before deleting it.")
        job_id = job.pk
        transaction.on_commit(lambda: storage.remove_files([job_id], []))


def _stop_after_cancel(job_id: int, task_id: str) -> None:
    try:
        dispatch.revoke(task_id)  # a worker that receives the queued message drops it
        dispatch.send(dispatch.STOP_CANCELLED, job_id, countdown=settings.COMPRESSOR_CANCEL_GRACE_S)
    except BROKER_ERRORS as exc:
        # The cancel stands (the claim and every heartbeat check the database); only the fallback is lost.
        logger.warning("Job %s cancelled while the queue is unreachable: %s", job_id, exc)


def job_set_priority(*, job: Job, priority: int) -> bool:
    """Change a queued job's priority and move it in the queue; False if it is no longer queued.

    The Redis message cannot be edited, so the job gets a new message (new task id) with the new priority;
    the old message finds a different task id on the job when it arrives and does nothing.
    """
    priority = max(0, min(9, int(priority)))
    new_task_id = broker.new_task_id()
    with transaction.atomic():
        done = transition(
            with_task(job.pk, job.celery_task_id), Action.RESEND, priority=priority, celery_task_id=new_task_id
        )
        if not done:
            return False
        old_task_id = job.celery_task_id
        job.priority, job.celery_task_id = priority, new_task_id
        job_log.job_log_append(job_id=job.pk, lines=[(Job.Stage.WAITING, f"Priority changed to {priority}.")])
        transaction.on_commit(lambda: broker.requeue(job, old_task_id))
    return True
