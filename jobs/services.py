"""Everything that changes a Job: submit, start, record progress, finish, fail, cancel, retry, clone, reap.

Status moves only here, and only from the expected state: each transition is one conditional UPDATE
(`filter(pk=..., status=EXPECTED).update(...)`) whose row count says whether it happened. A late message
from a killed or cancelled task therefore changes nothing. The form view, the API and the admin call
these same functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.db.models import Aggregate, Count, OuterRef, Q, QuerySet, Subquery, Sum
from django.utils import timezone
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from engine.errors import EngineError, PreflightError
from engine.submission import SubmissionCheck, check_submission
from engine.units import duration_text, size_text
from jobs import artifact_store, dispatch, nodes
from jobs.compiled import ANY_ID, compiled_once, fetch_one
from jobs.inputs import JobInput, api_calibration, job_spec
from jobs.models import CalibrationDataset, Job, JobLogLine, WorkerNode
from jobs.ratelimit import RateLimited, Window
from jobs.redaction import redact
from jobs.uploads import calibration_check

logger = logging.getLogger(__name__)

Status = Job.Status
# What publishing to an unreachable or restarting Redis raises.
BROKER_ERRORS = (OperationalError, RedisError, OSError)


class JobStateError(Exception):
    """The job is not in a state that allows this action (e.g. cancelling a finished job)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Submission(NamedTuple):
    """job_submit's answer. created=False: an identical succeeded job of the same user is offered instead."""

    job: Job
    created: bool


# --- submission ----------------------------------------------------------------------------------------


def job_submit(
    *,
    owner: AbstractBaseUser,
    data: JobInput,
    force: bool = False,
    retry_of: Job | None = None,
    attempt: int = 1,
) -> Submission:
    """Check the job (policy, then the submission check), record it, then queue it once the transaction commits.

    The submission check is cheap and certain (engine.submission: no torch, no download); the recipe it
    resolves and a hub model's commit are recorded on the job, and the worker runs exactly those.

    Raises PreflightError (with .field) when the job cannot succeed, and RateLimited when the owner is over
    the creation rate or a quota (active jobs, stored bytes); it never takes a queue place then, and only
    created jobs count toward the rate (a request holds its place while it is checked). Deduplication:
    unless force is set, a succeeded job of the same owner with the same model revision, resolved recipe,
    calibration data and evaluation is returned instead (Submission.created is False) and no work is queued.
    """
    _check_policy(owner=owner, data=data)
    rate = creation_window(owner.pk)
    # The place is taken first (one round trip to the cache), so that a user over the rate costs no hub call;
    # a request that creates nothing gives it back.
    place = rate.take()
    if place is None:
        raise _creation_rate_error(rate)
    try:
        submission = _submit_checked(owner=owner, data=data, force=force, retry_of=retry_of, attempt=attempt)
    except BaseException:
        Window.give_back(place)
        raise
    if not submission.created:
        Window.give_back(place)
    return submission


def _submit_checked(
    *, owner: AbstractBaseUser, data: JobInput, force: bool, retry_of: Job | None, attempt: int
) -> Submission:
    """job_submit once the owner's place in the creation window is taken."""
    _refuse_over_storage(user_stored_bytes(owner))
    job = _job_from_input(owner=owner, data=data)
    report = check_submission(job_spec(job, fetch_upload=False))  # the stored row count, not the file
    job.resolved_recipe = report.recipe_yaml
    job.model_commit = report.model.commit or ""
    job.model_facts = nodes.facts_with_shape(report.model)
    job.spec_fingerprint = _fingerprint(job, report)
    if not force:
        existing = (
            Job.objects.filter(owner=owner, status=Status.SUCCEEDED, spec_fingerprint=job.spec_fingerprint)
            .order_by("-finished_at")
            .first()
        )
        if existing is not None:
            return Submission(job=existing, created=False)
    job.retry_of = retry_of
    job.attempt = attempt
    route = nodes.job_route(job)  # a queue whose workers can hold it; refused when no registered worker can
    job.queue = route.queue
    job.celery_task_id = _new_task_id()
    lines = [(Job.Stage.WAITING, f"Queued on '{job.queue}' with priority {job.priority}.")]
    lines += [(Job.Stage.WAITING, route.why)] if route.why else []
    lines += [(Job.Stage.WAITING, f"Warning: {warning}") for warning in report.warnings]
    with transaction.atomic():
        # The owner's submissions (and deletions of their uploads) wait for each other only from here to the
        # commit: the lock, the upload this job names still there, then the active jobs counted with this one.
        _lock_quotas(owner)
        _check_upload_kept(job)
        job.save()
        JobLogLine.objects.bulk_create(_log_rows(job.pk, lines))  # a new job's log needs no trimming
        _check_active_jobs(owner)
        transaction.on_commit(lambda: _enqueue(job))
    return Submission(job=job, created=True)


def _check_upload_kept(job: Job) -> None:
    """An upload deleted while the job that names it was checked refuses the job (not a 500 at the commit)."""
    upload_id = job.calibration_file_id
    if upload_id is not None and not CalibrationDataset.objects.filter(pk=upload_id).exists():
        raise PreflightError(
            "The calibration file was deleted while the job was checked; upload it again.", field="calibration"
        )


def job_retry(*, job: Job) -> Job:
    """A new job with the same request, linked to the failed or cancelled one (attempt + 1)."""
    if job.status not in (Status.FAILED, Status.CANCELLED):
        raise JobStateError(f"Job {job.pk} is {job.status}; only failed or cancelled jobs can be retried.")
    # An operator may have raised the old job's priority above the owner's cap; the retry keeps within it.
    data = dataclasses.replace(JobInput.from_job(job), priority=min(job.priority, max_priority_for(job.owner)))
    submission = job_submit(owner=job.owner, data=data, force=True, retry_of=job, attempt=job.attempt + 1)
    return submission.job


def job_clone(*, job: Job, owner: AbstractBaseUser, data: JobInput, force: bool = False) -> Submission:
    """ "Clone and edit": the edited request (the form started from JobInput.from_job(job)), linked to the old job."""
    return job_submit(owner=owner, data=data, force=force, retry_of=job)


# --- policy: the operator's limits (the form, the API and the admin all submit through job_submit) ----------


def max_priority_for(user: AbstractBaseUser) -> int:
    """The highest priority a user may ask for: staff 9, others COMPRESSOR_USER_MAX_PRIORITY."""
    return Job.PRIORITY_HIGH if user.is_staff else settings.COMPRESSOR_USER_MAX_PRIORITY


def creation_window(owner_id: int) -> Window:
    """The owner's job-creation window: COMPRESSOR_JOB_CREATE_RATE created jobs, counted in the shared cache."""
    return Window(name="job-create", subject=str(owner_id), rate=settings.COMPRESSOR_JOB_CREATE_RATE)


def _creation_rate_error(window: Window) -> RateLimited:
    minutes = -(-window.seconds_left() // 60)
    return RateLimited(
        f"You have created {window.limit} jobs in this period ({settings.COMPRESSOR_JOB_CREATE_RATE}); "
        f"try again in {minutes} min.",
        retry_after=window.seconds_left(),
    )


def _lock_quotas(owner: AbstractBaseUser) -> None:
    """Serialise one user's submissions until the transaction ends, so a quota is counted and kept at once.

    PostgreSQL: a row lock on the user. SQLite ignores select_for_update, but its transactions begin
    IMMEDIATE (settings), which takes the database's write lock at once.
    """
    fetch_one(_owner_lock, {ANY_ID: owner.pk})


@compiled_once
def _owner_lock():
    return get_user_model().objects.select_for_update().filter(pk=ANY_ID).values_list("pk")


def user_stored_bytes(user: AbstractBaseUser) -> int:
    """What a user keeps on the server: checkpoint weights of their succeeded jobs plus their uploads."""
    checkpoints, uploads = fetch_one(_stored_bytes_query, {ANY_ID: user.pk})
    return int(checkpoints or 0) + int(uploads or 0)


class Quota(NamedTuple):
    """What a user uses of each limit the services hold them to, as the jobs page shows it."""

    stored_bytes: int
    stored_limit: int
    active_jobs: int
    active_limit: int
    created: int
    create_rate: str  # N/period, as COMPRESSOR_JOB_CREATE_RATE says it


def user_quota(user: AbstractBaseUser) -> Quota:
    """The user's stored bytes, queued or running jobs and jobs created in the rate's window, with the limits
    job_submit and the upload check refuse at."""
    return Quota(
        stored_bytes=user_stored_bytes(user),
        stored_limit=settings.COMPRESSOR_USER_MAX_STORED_BYTES,
        active_jobs=int(fetch_one(_active_jobs_query, {ANY_ID: user.pk})[0] or 0),
        active_limit=settings.COMPRESSOR_USER_MAX_ACTIVE_JOBS,
        created=creation_window(user.pk).count(),
        create_rate=settings.COMPRESSOR_JOB_CREATE_RATE,
    )


def _check_active_jobs(owner: AbstractBaseUser) -> None:
    """A new job (already saved, counted among the active ones) within COMPRESSOR_USER_MAX_ACTIVE_JOBS queued
    or running (call under _lock_quotas)."""
    most = settings.COMPRESSOR_USER_MAX_ACTIVE_JOBS
    active = int(fetch_one(_active_jobs_query, {ANY_ID: owner.pk})[0] or 0) - 1  # without the new job
    if active >= most:
        raise RateLimited(
            f"You have {active} jobs queued or running, the most allowed ({most}); wait for one to finish or "
            "cancel one.",
            retry_after=60,
        )


def _per_owner(rows: QuerySet, aggregate: Aggregate) -> Subquery:
    totals = rows.filter(owner=OuterRef("pk")).order_by().values("owner").annotate(total=aggregate)
    return Subquery(totals.values("total")[:1])


@compiled_once
def _active_jobs_query():
    active = _per_owner(Job.objects.filter(status__in=Job.ACTIVE), Count("pk"))
    return get_user_model().objects.filter(pk=ANY_ID).annotate(active=active).values_list("active")


@compiled_once
def _stored_bytes_query():
    # One index entry per succeeded job (job_owner_quota): 1.1 ms of PostgreSQL for 8 300 of them, which is
    # why job submissions read it before the owner's lock (a new job stores nothing yet) and only an upload,
    # which adds bytes, reads it under the lock.
    return (
        get_user_model()
        .objects.filter(pk=ANY_ID)
        .annotate(
            checkpoints=_per_owner(Job.objects.filter(status=Status.SUCCEEDED), Sum("checkpoint_bytes")),
            uploads=_per_owner(CalibrationDataset.objects, Sum("size_bytes")),
        )
        .values_list("checkpoints", "uploads")
    )


def _check_stored_bytes(owner: AbstractBaseUser, *, adding: int = 0) -> None:
    """At most COMPRESSOR_USER_MAX_STORED_BYTES kept per user (call under _lock_quotas)."""
    _refuse_over_storage(user_stored_bytes(owner), adding=adding)


def _refuse_over_storage(stored: int, *, adding: int = 0) -> None:
    most = settings.COMPRESSOR_USER_MAX_STORED_BYTES
    if stored >= most or stored + adding > most:
        raise RateLimited(
            f"You store {size_text(stored)} of checkpoints and uploads and the quota is {size_text(most)}; "
            f"checkpoints are deleted {settings.COMPRESSOR_RETENTION_DAYS} days after their job ended, "
            "or ask an operator.",
            retry_after=3600,
        )


def _check_policy(*, owner: AbstractBaseUser, data: JobInput) -> None:
    """Operator rules preflight does not know about (the engine serves trusted command-line users too)."""
    # Local model folders: refused by the engine from the text alone (JobInput.to_spec passes the setting), so the
    # answer never tells which paths exist on the server.
    if data.calibration_kind == Job.CalibrationKind.UPLOAD:
        if data.calibration_file is None:
            raise PreflightError("Choose one of your uploaded calibration files.", field="calibration")
        if data.calibration_file.owner_id != owner.pk:
            raise PreflightError("That calibration file does not exist.", field="calibration")
    if data.evaluation and data.evaluation.get("heldout_path") and not settings.COMPRESSOR_ALLOW_LOCAL_PATHS:
        raise PreflightError("Local held-out files are disabled on this server.", field="evaluation")
    cap = max_priority_for(owner)
    if data.priority > cap:
        raise PreflightError(f"At most {cap}; operators can raise it in the admin.", field="priority")
    if data.device_class and data.device_class not in Job.DeviceClass.values:
        raise PreflightError(f"Unknown device class '{data.device_class}'.", field="device_class")
    _check_gpus(data)


def _check_gpus(data: JobInput) -> None:
    if data.gpus is None:
        return
    if (data.device_class or settings.COMPRESSOR_DEFAULT_DEVICE_CLASS) == Job.DeviceClass.CPU:
        raise PreflightError("A CPU job uses no GPU: leave the number of GPUs empty.", field="gpus")
    cap = settings.COMPRESSOR_MAX_GPUS_PER_JOB
    if not 1 <= data.gpus <= cap:
        raise PreflightError(f"Ask for 1 to {cap} GPUs, or for as many as the plan needs.", field="gpus")


def _job_from_input(*, owner: AbstractBaseUser, data: JobInput) -> Job:
    return Job(owner=owner, **data.job_fields())


def _fingerprint(job: Job, report: SubmissionCheck) -> str:
    """Identical work has the same fingerprint: model revision, resolved recipe, calibration data, evaluation."""
    # A hub model by its commit: the exact revision even when a branch (or none) was given.
    revision = report.model.commit or job.model_revision or ""
    calibration: dict[str, Any] | None = None
    # A custom recipe may calibrate, and so may a preset of a sweep: its data counts.
    if report.needs_calibration is not False or job.search:
        # The uploaded file by its content, not its id: the same data uploaded twice is the same work.
        calibration = {key: value for key, value in api_calibration(job).items() if key != "dataset_id"}
        calibration["file_sha256"] = job.calibration_file.sha256 if job.calibration_file else None
    payload = {
        "model": job.model_source,
        "revision": revision,
        "recipe": report.recipe_yaml,
        "calibration": calibration,
        "evaluation": job.evaluation,
    }
    if job.search is not None:  # only then, so that earlier jobs keep their fingerprints
        payload["search"] = job.search
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _new_task_id() -> str:
    return str(uuid.uuid4())


def broker_priority(priority: int) -> int:
    """Job priority (9 runs first) -> Redis broker priority (0 is polled first)."""
    return 9 - max(0, min(9, int(priority)))


QUEUE_UNREACHABLE = "The queue is unreachable right now; the job is kept and will be sent when the queue is back."


def _enqueue(job: Job) -> bool:
    """Send the job's message; False when the broker does not answer.

    The job stays queued in the database either way (the database is the truth): job_sweep_stranded sends
    it again once the broker answers, so a Redis outage never turns a request into a 500 or loses a job.
    """
    try:
        dispatch.send(
            dispatch.COMPRESS,
            job.pk,
            task_id=job.celery_task_id,
            queue=job.queue,
            priority=broker_priority(job.priority),
        )
    except BROKER_ERRORS as exc:
        logger.warning("Could not send job %s to the queue: %s", job.pk, exc)
        job.message = QUEUE_UNREACHABLE
        with transaction.atomic():
            if Job.objects.filter(pk=job.pk, status=Status.QUEUED).update(message=QUEUE_UNREACHABLE):
                _append_log(job.pk, [(Job.Stage.WAITING, QUEUE_UNREACHABLE)])
        return False
    return True


# --- the worker's side ---------------------------------------------------------------------------------
#
# Every write of a run matches the job id, RUNNING and the run's own task id: a stalled run that the reaper
# has re-queued (new task id) or that was cancelled can never write into, finish or fail the job's next run.


def _this_run(job_id: int, task_id: str):
    return Job.objects.filter(pk=job_id, status=Status.RUNNING, celery_task_id=task_id)


def job_start(*, job_id: int, task_id: str, worker: str) -> Job | None:
    """Claim a queued job for this task. None: cancelled, claimed by someone else, or a stale message."""
    now = timezone.now()
    # The claim and its "Started on" line commit together: every run that started says so in its log, even
    # one whose process is frozen or killed right after the claim.
    with transaction.atomic():
        claimed = Job.objects.filter(pk=job_id, status=Status.QUEUED, celery_task_id=task_id).update(
            status=Status.RUNNING,
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
        _append_log(job_id, [(Job.Stage.PREPARING, f"Started on {worker}.")])
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
        if not _this_run(job_id, task_id).update(**fields):
            return False
        if log_lines:
            _append_log(job_id, log_lines)
    return True


def job_finish(
    *, job_id: int, task_id: str, results: dict[str, Any], manifest: dict[str, Any], artifacts_path: str
) -> bool:
    """Running -> succeeded with results and the checkpoint; False if this run no longer owns the job."""
    with transaction.atomic():
        done = _this_run(job_id, task_id).update(
            status=Status.SUCCEEDED,
            finished_at=timezone.now(),
            stage=Job.Stage.DONE,
            percent=100.0,
            message="Checkpoint ready",
            results=results,
            manifest=manifest,
            artifacts_path=artifacts_path,
        )
        if done:
            _append_log(job_id, [(Job.Stage.DONE, "Succeeded: the checkpoint is ready to download.")])
    return bool(done)


def job_fail(*, job_id: int, task_id: str, error: str, log_lines: list[tuple[str, str]] | None = None) -> bool:
    """Running -> failed with the reason in plain words; False if this run no longer owns the job."""
    return _fail(_this_run(job_id, task_id), job_id=job_id, error=error, log_lines=log_lines)


def _fail(rows, *, job_id: int, error: str, log_lines: list[tuple[str, str]] | None = None) -> bool:
    with transaction.atomic():
        error = redact(error)
        done = rows.update(status=Status.FAILED, finished_at=timezone.now(), error=error, message="Failed")
        if done:
            _append_log(job_id, [*(log_lines or []), ("", f"Failed: {error}")])
    return bool(done)


def job_discard_run_output(*, job_id: int, task_id: str, keep_resume: bool = False) -> None:
    """Remove a run's output unless a newer run of the job owns the folder now (the reaper re-queued it).

    keep_resume: keep the layers it compressed (jobs.resume_folders), for a retry of the failed job."""
    job = Job.objects.filter(pk=job_id).first()
    if job is not None and job.celery_task_id == task_id:
        job_remove_artifacts(job=job, keep_resume=keep_resume)


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
        done = Job.objects.filter(pk=job.pk, status__in=Job.ACTIVE).update(
            status=Status.CANCELLED, finished_at=timezone.now(), message=f"Cancelled{who}"
        )
        if not done:
            job.refresh_from_db()
            raise JobStateError(f"Job {job.pk} has already {job.status}; it cannot be cancelled.")
        _append_log(job.pk, [("", f"Cancelled{who}.")])
        task_id = job.celery_task_id
        transaction.on_commit(lambda: _stop_after_cancel(job.pk, task_id))
    job.refresh_from_db()
    return job


def job_delete(*, job: Job) -> None:
    """Delete an ended job: its row, log lines and hub pushes, then its files once that commits (as retention
    does, so a crash in between leaves only files the orphan check removes). Refused with JobStateError while
    it is queued or running: cancel it first. Its checkpoint's bytes leave the owner's quota."""
    with transaction.atomic():
        deleted, _ = Job.objects.filter(pk=job.pk, status__in=Job.TERMINAL).delete()
        if not deleted:
            job.refresh_from_db()
            raise JobStateError(f"Job {job.pk} is {job.get_status_display().lower()}; cancel it before deleting it.")
        job_id = job.pk
        transaction.on_commit(lambda: _remove_files([job_id], []))


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
    new_task_id = _new_task_id()
    with transaction.atomic():
        done = Job.objects.filter(pk=job.pk, status=Status.QUEUED, celery_task_id=job.celery_task_id).update(
            priority=priority, celery_task_id=new_task_id
        )
        if not done:
            return False
        old_task_id = job.celery_task_id
        job.priority, job.celery_task_id = priority, new_task_id
        _append_log(job.pk, [(Job.Stage.WAITING, f"Priority changed to {priority}.")])
        transaction.on_commit(lambda: _requeue(job, old_task_id))
    return True


def _requeue(job: Job, old_task_id: str) -> None:
    try:
        dispatch.revoke(old_task_id)
    except BROKER_ERRORS as exc:
        logger.warning("Could not revoke the old message of job %s: %s", job.pk, exc)
    _enqueue(job)


MAX_REQUEUES = 1  # a job whose worker vanishes is tried this many more times, then failed


def job_reap_stale(*, now=None) -> list[tuple[int, str]]:
    """End running jobs whose worker stopped sending heartbeats: re-queue each once, then fail it.

    A job that ran past the hard time limit was killed by it: it fails with "time limit" and is never
    re-queued (another run would only hit the same limit). The partial output a lost run leaves is
    removed by the job's next run or, once the job has ended, by job_remove_stale_partials. Every change
    is guarded by the heartbeat and the task id the reaper saw, so a run that wakes up and beats meanwhile
    keeps its job. Returns (job id, "requeued" | "failed") for each job it acted on.
    """
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.COMPRESSOR_HEARTBEAT_TIMEOUT_S)
    stale = Job.objects.filter(status=Status.RUNNING).filter(
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, started_at__lt=cutoff)
    )
    acted: list[tuple[int, str]] = []
    for job in stale:
        seen = _this_run(job.pk, job.celery_task_id).filter(heartbeat_at=job.heartbeat_at)
        last = job.heartbeat_at or job.started_at
        silence = (
            f"the worker {job.worker or '(unknown)'} stopped answering (last heartbeat {last:%Y-%m-%d %H:%M:%S} UTC)"
        )
        ran_s = (now - job.started_at).total_seconds() if job.started_at else 0.0
        if ran_s >= settings.COMPRESSOR_JOB_HARD_LIMIT_S:
            if _fail(seen, job_id=job.pk, error=time_limit_error(settings.COMPRESSOR_JOB_HARD_LIMIT_S)):
                acted.append((job.pk, "failed"))
        elif action := _end_lost_run(job, seen, silence):
            acted.append((job.pk, action))
    return acted


def job_worker_lost(*, job_id: int, task_id: str, reason: str) -> str | None:
    """The process running this run died (killed, out of memory): re-queue the job once, else fail it.

    The worker's main process calls this the moment its child dies; the reaper does the same, after the
    heartbeat timeout, for a worker that died whole. Returns "requeued", "failed" or None (nothing to do).
    """
    job = _this_run(job_id, task_id).first()
    if job is None:
        return None
    return _end_lost_run(job, _this_run(job_id, task_id), f"the worker {job.worker or '(unknown)'} {reason}")


def _end_lost_run(job: Job, seen, what_happened: str) -> str | None:
    if job.requeue_count < MAX_REQUEUES:
        return "requeued" if _requeue_lost(job, seen, what_happened) else None
    attempts = job.requeue_count + 1
    error = f"Worker lost: {what_happened}. This was attempt {attempts} of {attempts}, so it is not re-queued."
    return "failed" if _fail(seen, job_id=job.pk, error=error) else None


def _requeue_lost(job: Job, seen, what_happened: str) -> bool:
    new_task_id = _new_task_id()
    # Its node may be gone. Where it is not (the run died, its worker did not), the layers the run compressed
    # are on that node's disk: the worker that noticed is on it, and sends the job back there.
    holder = job.worker if job.worker and job_resume_folder(job).is_dir() else None
    route = nodes.job_reroute(job, back_to=holder)
    with transaction.atomic():
        done = seen.update(
            status=Status.QUEUED,
            queue=route.queue,
            requeue_count=job.requeue_count + 1,
            celery_task_id=new_task_id,
            stage=Job.Stage.WAITING,
            message="Re-queued after its worker vanished",
            started_at=None,
            worker="",
            step=None,
            total=None,
            percent=None,
        )
        if done:
            job.celery_task_id, job.queue = new_task_id, route.queue
            _append_log(
                job.pk, [(Job.Stage.WAITING, f"Re-queued for attempt {job.requeue_count + 2}: {what_happened}.")]
            )
            if route.why:
                _append_log(job.pk, [(Job.Stage.WAITING, route.why)])
            transaction.on_commit(lambda: _enqueue(job))
    return bool(done)


def job_sweep_stranded(*, older_than_s: float | None = None) -> list[int]:
    """Send queued jobs again whose broker message is gone; return their ids.

    A message is lost when publishing failed after the commit (Redis down) or when Redis lost its data
    (flushed, restarted without persistence). The database is the truth: a queued job whose task id is in
    none of its queue's lists and not among the delivered-but-unacknowledged messages gets a new task id
    and a new message. A job runs at most once even if the old message turns up after all: the claim
    (job_start) needs the job's current task id. Jobs younger than older_than_s (default
    COMPRESSOR_SWEEP_GRACE_S) are left alone, their message may still be on its way.
    """
    grace = settings.COMPRESSOR_SWEEP_GRACE_S if older_than_s is None else older_than_s
    cutoff = timezone.now() - timedelta(seconds=grace)
    waiting = list(Job.objects.filter(status=Status.QUEUED, created_at__lte=cutoff))
    if not waiting:
        return []
    in_broker = broker_task_ids(queues={job.queue for job in waiting})
    sent: list[int] = []
    for job in waiting:
        if job.celery_task_id in in_broker:
            continue
        new_task_id = _new_task_id()
        route = nodes.job_reroute(job)  # the node whose queue it waited in may be gone
        with transaction.atomic():
            done = Job.objects.filter(pk=job.pk, status=Status.QUEUED, celery_task_id=job.celery_task_id).update(
                celery_task_id=new_task_id, queue=route.queue, message="Waiting in the queue"
            )
            if done:
                job.celery_task_id, job.queue = new_task_id, route.queue
                _append_log(
                    job.pk,
                    [(Job.Stage.WAITING, "Its queue message was lost (queue unreachable or reset); sent again.")],
                )
                transaction.on_commit(lambda job=job: _enqueue(job))
                sent.append(job.pk)
    return sent


def job_reroute_from_offline_nodes() -> list[int]:
    """Queued jobs waiting in the own queue of a worker that is offline now: routed again (to another worker
    that can hold them, or the shared queue), each with a new message; the old one finds a different task id
    if that worker comes back. A job only that worker can hold keeps waiting for it. Returns the jobs moved."""
    offline = [nodes.own_queue(node.hostname) for node in WorkerNode.objects.all() if not node.is_online()]
    moved: list[int] = []
    for job in Job.objects.filter(status=Status.QUEUED, queue__in=offline):
        route = nodes.job_reroute(job)
        if route.queue == job.queue:
            continue
        old_task_id, new_task_id = job.celery_task_id, _new_task_id()
        with transaction.atomic():
            done = Job.objects.filter(pk=job.pk, status=Status.QUEUED, celery_task_id=old_task_id).update(
                queue=route.queue, celery_task_id=new_task_id
            )
            if done:
                _append_log(
                    job.pk, [(Job.Stage.WAITING, f"The worker of '{job.queue}' is offline; sent to '{route.queue}'.")]
                )
                job.queue, job.celery_task_id = route.queue, new_task_id
                transaction.on_commit(lambda job=job, old=old_task_id: _requeue(job, old))
                moved.append(job.pk)
    return moved


def broker_task_ids(*, queues: set[str]) -> set[str]:
    """Task ids of the messages Redis holds for these queues: waiting (every priority level) or delivered
    to a worker and not yet acknowledged. Raises a broker error when Redis does not answer."""
    from compressor_app.celery import app

    with app.connection_for_read() as conn:
        channel = conn.default_channel
        prefix = getattr(channel, "global_keyprefix", "")  # LRANGE and HVALS are not prefixed by kombu itself
        client = channel.client
        raw: list[bytes] = []
        for queue in queues:
            for level in sorted({channel._q_for_pri(queue, step) for step in channel.priority_steps}):
                raw += client.lrange(prefix + level, 0, -1)
        unacked = [json.loads(value)[0] for value in client.hvals(prefix + channel.unacked_key)]
    messages = [json.loads(item) for item in raw] + unacked
    return {message.get("headers", {}).get("id") for message in messages if isinstance(message, dict)} - {None}


def job_remove_stale_partials() -> list[Path | str]:
    """Remove the temporary checkpoint folders of runs that are over (killed during a save, out of memory,
    a lost worker), and with a bucket their unfinished uploads; a running job's own files are left alone.
    Returns what it removed (jobs.artifact_store.remove_stale_partials)."""
    return artifact_store.remove_stale_partials()


# --- artifacts and uploads ---------------------------------------------------------------------------------


def job_folder(job: Job) -> Path:
    """The job's own folder on this machine: its checkpoint while it is written (local storage: for good) and
    the layers its runs compressed so far."""
    return artifact_store.local_job_folder(job.pk)


RESUME_FOLDER = artifact_store.RESUME_FOLDER


def job_resume_folder(job: Job) -> Path:
    """The layers the job's runs compressed so far (jobs.resume_folders), on the machine that ran them."""
    return job_folder(job) / RESUME_FOLDER


def job_remove_artifacts(*, job: Job, keep_resume: bool = False) -> None:
    """Delete the job's files: partial output of a cancelled or failed run, or an old checkpoint.

    keep_resume: everything but its resume folder (a new run of the job resumes from it)."""
    artifact_store.remove_job_files(job.pk, keep_resume=keep_resume)


def calibration_dataset_create(*, owner: AbstractBaseUser, name: str, upload: UploadedFile) -> CalibrationDataset:
    """Store an uploaded JSONL calibration file with its sha256 and usable rows, counted once as it streamed in
    (jobs.uploads); raise EngineError (field "file") when it is unusable."""
    if upload.size and upload.size > settings.COMPRESSOR_MAX_UPLOAD_BYTES:
        raise EngineError(
            f"The file is larger than the limit of {settings.COMPRESSOR_MAX_UPLOAD_BYTES // 2**20} MiB.", field="file"
        )
    check = calibration_check(upload)
    with transaction.atomic():
        _lock_quotas(owner)
        _check_stored_bytes(owner, adding=upload.size or 0)
    dataset = CalibrationDataset(
        owner=owner,
        name=(name or upload.name or "calibration.jsonl")[:200],  # a browser's file name can be longer
        sha256=check.sha256,
        size_bytes=upload.size,
        rows=check.rows,
    )
    dataset.file.save("upload.jsonl", upload, save=False)
    dataset.save()
    return dataset


def calibration_dataset_delete(*, dataset: CalibrationDataset) -> None:
    """Delete an upload and its file (its bytes leave the owner's quota); refused with JobStateError while a
    queued or running job uses it. Jobs that ended keep their record, without the file."""
    with transaction.atomic():
        _lock_quotas(dataset.owner)
        if dataset.jobs.filter(status__in=Job.ACTIVE).exists():
            raise JobStateError(
                f"The file '{dataset.name}' is used by a queued or running job; delete it once that job has ended."
            )
        stored_name = dataset.file.name
        dataset.delete()
        transaction.on_commit(lambda: _remove_files([], [stored_name]))


# --- the log -------------------------------------------------------------------------------------------


def job_log_append(*, job_id: int, lines: list[tuple[str, str]]) -> None:
    """Add (stage, text) lines to a job's log after it ran (a push to a hub): without paths or tokens."""
    _append_log(job_id, lines)


def _append_log(job_id: int, lines: list[tuple[str, str]]) -> None:
    """Append (stage, text) lines and keep only the newest COMPRESSOR_JOB_LOG_MAX_LINES."""
    JobLogLine.objects.bulk_create(_log_rows(job_id, lines))
    keep = settings.COMPRESSOR_JOB_LOG_MAX_LINES
    oldest_kept = JobLogLine.objects.filter(job_id=job_id).order_by("-id").values_list("id", flat=True)[keep - 1 : keep]
    oldest = list(oldest_kept)
    if oldest:
        JobLogLine.objects.filter(job_id=job_id, id__lt=oldest[0]).delete()


def _log_rows(job_id: int, lines: list[tuple[str, str]]) -> list[JobLogLine]:
    return [JobLogLine(job_id=job_id, stage=stage or "", text=redact(text)[:4000]) for stage, text in lines]


# --- retention and orphans ------------------------------------------------------------------------------


class Expired(NamedTuple):
    jobs: list[int]
    uploads: list[int]


def artifacts_expire(*, now: datetime | None = None) -> Expired:
    """Delete what is older than COMPRESSOR_RETENTION_DAYS (0 keeps everything): ended jobs with their rows,
    log lines and folders, then uploads no remaining job uses.

    Rows go first, in one transaction; the files once it commits. A crash in between leaves only files
    without rows, which the orphan check (orphans_find) reports and removes; never a row whose files are gone.
    """
    days = settings.COMPRESSOR_RETENTION_DAYS
    if days <= 0:
        return Expired(jobs=[], uploads=[])
    cutoff = (now or timezone.now()) - timedelta(days=days)
    ended_before = Q(finished_at__lt=cutoff) | Q(finished_at__isnull=True, created_at__lt=cutoff)
    with transaction.atomic():
        jobs = Job.objects.select_for_update().filter(ended_before, status__in=Job.TERMINAL)
        job_ids = list(jobs.values_list("pk", flat=True))
        Job.objects.filter(pk__in=job_ids).delete()
        uploads = CalibrationDataset.objects.filter(created_at__lt=cutoff, jobs__isnull=True)
        upload_files = dict(uploads.values_list("pk", "file"))
        CalibrationDataset.objects.filter(pk__in=upload_files).delete()
        transaction.on_commit(lambda: _remove_files(job_ids, list(upload_files.values())))
    return Expired(jobs=job_ids, uploads=list(upload_files))


def _remove_files(job_ids: list[int], stored_names: list[str]) -> None:
    for job_id in job_ids:
        artifact_store.remove_job_files(job_id)
    for name in stored_names:
        default_storage.delete(name)


@dataclass
class Orphans:
    """Stored files that no row accounts for, and rows whose files are gone (names in the storage)."""

    files_without_rows: list[str]
    rows_without_files: list[str]

    def __bool__(self) -> bool:
        return bool(self.files_without_rows or self.rows_without_files)


def orphans_find() -> Orphans:
    """Compare the job folders and uploads in the storage (MEDIA_ROOT or the bucket) with the rows.

    A job folder may hold only its published checkpoint (succeeded jobs) or the resume folder a failed job keeps
    for its retry; a queued or running job's folder is
    left alone (its run writes there). Anything else is an orphan: a folder of a deleted job, a checkpoint
    of a job that did not succeed, a stale temporary folder of a killed run, an upload without its row.
    """
    files: list[str] = []
    jobs = {job.pk: job for job in Job.objects.only("pk", "status", "artifacts_path")}
    for name in artifact_store.list_names("jobs"):
        job = jobs.get(int(name)) if name.isdigit() else None
        if job is None:
            files.append(f"jobs/{name}")
        elif job.status not in Job.ACTIVE:
            published = job.artifacts_path if job.status == Status.SUCCEEDED and job.artifacts_path else None
            # A failed job keeps the layers it compressed for its retry (jobs.resume_folders).
            resume = f"jobs/{name}/{RESUME_FOLDER}" if job.status == Status.FAILED else None
            entries = [f"jobs/{name}/{entry}" for entry in artifact_store.list_names(f"jobs/{name}")]
            files += [entry for entry in entries if entry not in (published, resume)]
    uploads = dict(CalibrationDataset.objects.values_list("file", "pk"))
    files += [name for name in artifact_store.walk_files("calibration") if name not in uploads]
    rows = [
        f"job {job.pk}: {job.artifacts_path}"
        for job in jobs.values()
        if job.status == Status.SUCCEEDED
        and not (job.artifacts_path and artifact_store.checkpoint_stored(job.artifacts_path))
    ]
    rows += [f"calibration dataset {pk}: {name}" for name, pk in uploads.items() if not default_storage.exists(name)]
    return Orphans(files_without_rows=files, rows_without_files=rows)


def orphans_remove(orphans: Orphans) -> None:
    """Delete the files no row accounts for (the rows without files are for an operator to look at)."""
    for name in orphans.files_without_rows:
        artifact_store.remove_name(name)


# --- API tokens -------------------------------------------------------------------------------------------


def token_rotate(*, user: AbstractBaseUser) -> str:
    """A new API token for the user; the old one stops working at once. Returns the new key."""
    from rest_framework.authtoken.models import Token

    with transaction.atomic():
        Token.objects.filter(user=user).delete()
        return Token.objects.create(user=user).key


def token_revoke(*, user: AbstractBaseUser) -> bool:
    """Delete the user's API token (programs using it get 401); False if there was none."""
    from rest_framework.authtoken.models import Token

    deleted, _ = Token.objects.filter(user=user).delete()
    return bool(deleted)
