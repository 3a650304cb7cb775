"""The operator's limits: what a user may ask for and how much they may use (the form, the API and the admin
all submit through submissions.job_submit, uploads through storage.calibration_dataset_create).

The engine serves trusted command-line users too, so these rules are the service's, not its preflight's:
the priority cap, local paths, the creation rate, active jobs and stored bytes per user.
"""

from __future__ import annotations

from typing import NamedTuple

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db.models import Aggregate, Count, OuterRef, QuerySet, Subquery, Sum

from engine.errors import PreflightError
from engine.units import size_text
from jobs.compiled import ANY_ID, compiled_once, fetch_one
from jobs.inputs import JobInput
from jobs.models import CalibrationDataset, Job
from jobs.ratelimit import RateLimited, Window


def max_priority_for(user: AbstractBaseUser) -> int:
    """The highest priority a user may ask for: staff 9, others COMPRESSOR_USER_MAX_PRIORITY."""
    return Job.PRIORITY_HIGH if user.is_staff else settings.COMPRESSOR_USER_MAX_PRIORITY


def creation_window(owner_id: int) -> Window:
    """The owner's job-creation window: COMPRESSOR_JOB_CREATE_RATE created jobs, counted in the shared cache."""
    return Window(name="job-create", subject=str(owner_id), rate=settings.COMPRESSOR_JOB_CREATE_RATE)


def creation_rate_error(window: Window) -> RateLimited:
    """The refusal of a job over the owner's creation rate, with when the window has room again."""
    minutes = -(-window.seconds_left() // 60)
    return RateLimited(
        f"You have created {window.limit} jobs in this period ({settings.COMPRESSOR_JOB_CREATE_RATE}); "
        f"try again in {minutes} min.",
        retry_after=window.seconds_left(),
    )


def lock_quotas(owner: AbstractBaseUser) -> None:
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


def check_active_jobs(owner: AbstractBaseUser) -> None:
    """A new job (already saved, counted among the active ones) within COMPRESSOR_USER_MAX_ACTIVE_JOBS queued
    or running (call under lock_quotas)."""
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
            checkpoints=_per_owner(Job.objects.filter(status=Job.Status.SUCCEEDED), Sum("checkpoint_bytes")),
            uploads=_per_owner(CalibrationDataset.objects, Sum("size_bytes")),
        )
        .values_list("checkpoints", "uploads")
    )


def check_stored_bytes(owner: AbstractBaseUser, *, adding: int = 0) -> None:
    """At most COMPRESSOR_USER_MAX_STORED_BYTES kept per user (call under lock_quotas)."""
    refuse_over_storage(user_stored_bytes(owner), adding=adding)


def refuse_over_storage(stored: int, *, adding: int = 0) -> None:
    """RateLimited when what the user stores, with adding bytes more, is over COMPRESSOR_USER_MAX_STORED_BYTES."""
    most = settings.COMPRESSOR_USER_MAX_STORED_BYTES
    if stored >= most or stored + adding > most:
        raise RateLimited(
            f"You store {size_text(stored)} of checkpoints and uploads and the quota is {size_text(most)}; "
            f"checkpoints are deleted {settings.COMPRESSOR_RETENTION_DAYS} days after their job ended, "
            "or ask an operator.",
            retry_after=3600,
        )


def check_request(*, owner: AbstractBaseUser, data: JobInput) -> None:
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
