"""New jobs: submit one (the operator's policy, then the submission check, then the queue), retry an ended
one, clone one with edits. The form view, the API and the admin all submit through job_submit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, NamedTuple

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from engine.errors import PreflightError
from engine.submission import SubmissionCheck, check_submission
from jobs import nodes
from jobs.inputs import JobInput, api_calibration, job_spec
from jobs.models import CalibrationDataset, Job, JobLogLine
from jobs.ratelimit import Window
from jobs.services import broker, job_log, policy
from jobs.services.errors import JobStateError
from jobs.services.transitions import TRANSITIONS, Action, may


class Submission(NamedTuple):
    """job_submit's answer. created=False: an identical succeeded job of the same user is offered instead."""

    job: Job
    created: bool


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
    policy.check_request(owner=owner, data=data)
    rate = policy.creation_window(owner.pk)
    # The place is taken first (one round trip to the cache), so that a user over the rate costs no hub call;
    # a request that creates nothing gives it back.
    place = rate.take()
    if place is None:
        raise policy.creation_rate_error(rate)
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
    policy.refuse_over_storage(policy.user_stored_bytes(owner))
    job = _job_from_input(owner=owner, data=data)
    report = check_submission(job_spec(job, fetch_upload=False))  # the stored row count, not the file
    job.resolved_recipe = report.recipe_yaml
    job.model_commit = report.model.commit or ""
    job.model_facts = nodes.facts_with_shape(report.model)
    job.spec_fingerprint = _fingerprint(job, report)
    if not force:
        existing = (
            Job.objects.filter(owner=owner, status=Job.Status.SUCCEEDED, spec_fingerprint=job.spec_fingerprint)
            .order_by("-finished_at")
            .first()
        )
        if existing is not None:
            return Submission(job=existing, created=False)
    job.retry_of = retry_of
    job.attempt = attempt
    route = nodes.job_route(job)  # a queue whose workers can hold it; refused when no registered worker can
    job.queue = route.queue
    job.celery_task_id = broker.new_task_id()
    lines = [(Job.Stage.WAITING, f"Queued on '{job.queue}' with priority {job.priority}.")]
    lines += [(Job.Stage.WAITING, route.why)] if route.why else []
    lines += [(Job.Stage.WAITING, f"Warning: {warning}") for warning in report.warnings]
    with transaction.atomic():
        # The owner's submissions (and deletions of their uploads) wait for each other only from here to the
        # commit: the lock, the upload this job names still there, then the active jobs counted with this one.
        policy.lock_quotas(owner)
        _check_upload_kept(job)
        job.save()
        JobLogLine.objects.bulk_create(job_log.log_rows(job.pk, lines))  # a new job's log needs no trimming
        policy.check_active_jobs(owner)
        transaction.on_commit(lambda: broker.enqueue(job))
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
    if not may(Action.RETRY, job.status):
        raise JobStateError(f"Job {job.pk} is {job.status}; only failed or cancelled jobs can be retried.")
    # An operator may have raised the old job's priority above the owner's cap; the retry keeps within it.
    data = dataclasses.replace(JobInput.from_job(job), priority=min(job.priority, policy.max_priority_for(job.owner)))
    submission = job_submit(owner=job.owner, data=data, force=True, retry_of=job, attempt=job.attempt + 1)
    return submission.job


def job_clone(*, job: Job, owner: AbstractBaseUser, data: JobInput, force: bool = False) -> Submission:
    """ "Clone and edit": the edited request (the form started from JobInput.from_job(job)), linked to the old job."""
    return job_submit(owner=owner, data=data, force=force, retry_of=job)


def _job_from_input(*, owner: AbstractBaseUser, data: JobInput) -> Job:
    return Job(owner=owner, status=TRANSITIONS[Action.SUBMIT].target, **data.job_fields())


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
