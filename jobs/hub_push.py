"""Pushing a succeeded job's checkpoint, with its model card (README.md), to a hub repository the user names.

The request records a HubPush (queued) and sends its id to the light queue; the task claims it with a
conditional UPDATE (queued -> running, so a redelivered message pushes nothing twice), decrypts the owner's
token, and calls huggingface_hub: create_repo, then upload_folder of exactly the files in the job's sha256
manifest (checked intact first) and the manifest. The outcome (commit and its link, or a reason in plain
words) goes on the push and into the job's log, never with the token.
"""

from __future__ import annotations

import logging
import re
import socket
import uuid
from dataclasses import dataclass
from datetime import timedelta

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from engine.errors import EngineError
from jobs import dispatch, downloads, hub_tokens
from jobs.models import HubPush, Job
from jobs.redaction import redact, redact_tokens
from jobs.services import job_log

logger = logging.getLogger(__name__)

Status = HubPush.Status
# namespace/name, as the hub spells repository ids (huggingface_hub's validate_repo_id checks the rest).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_STAGE = "push"  # the job log's stage label for these lines
_REAP_GRACE_S = 60  # past the hard limit: the worker's own kill and failure hook have had their chance


class PushRefused(EngineError):
    """The push cannot be queued (the job, the repository id or the missing token); .field names the input."""


@dataclass(frozen=True)
class Pushed:
    commit_sha: str
    commit_url: str


# --- the request (the web process) ------------------------------------------------------------------------


def hub_push_request(*, job: Job, by: AbstractBaseUser, repo_id: str, private: bool = True) -> HubPush:
    """Queue a push of the job's checkpoint to repo_id with by's hub token. Raises PushRefused."""
    if job.status != Job.Status.SUCCEEDED:
        raise PushRefused(f"Job {job.pk} is {job.status}; only a succeeded job's checkpoint can be pushed.")
    repo_id = repo_id.strip()
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise PushRefused("Name the repository as namespace/name, e.g. your-name/my-model-FP8.", field="repo_id")
    if hub_tokens.hub_token_for(owner=by) is None:
        raise PushRefused("Set your hub token first (a token with write access).", field="token")
    with transaction.atomic():
        push = HubPush.objects.create(
            job=job, owner=by, repo_id=repo_id, private=private, celery_task_id=str(uuid.uuid4())
        )
        job_log.job_log_append(job_id=job.pk, lines=[(_STAGE, f"Push to the hub repository {repo_id} queued.")])
        transaction.on_commit(lambda: _enqueue(push))
    return push


def _enqueue(push: HubPush) -> None:
    try:
        dispatch.send(dispatch.PUSH_TO_HUB, push.pk, task_id=push.celery_task_id, queue=dispatch.Queue.LIGHT)
    except dispatch.BROKER_ERRORS as exc:
        logger.warning("Could not send push %s to the queue: %s", push.pk, exc)
        _end(push, Status.QUEUED, error="The queue is unreachable right now; push again in a moment.")


def hub_pushes_for_job(*, job: Job) -> list[HubPush]:
    return list(job.hub_pushes.all()[:20])


# --- the run (the light worker) -----------------------------------------------------------------------------


def hub_push_run(*, push_id: int) -> HubPush | None:
    """Claim the queued push and run it to succeeded or failed; None when it was not waiting (a redelivery)."""
    now = timezone.now()
    if not HubPush.objects.filter(pk=push_id, status=Status.QUEUED).update(status=Status.RUNNING, started_at=now):
        return None
    push = HubPush.objects.select_related("job", "owner").get(pk=push_id)
    record = hub_tokens.hub_token_for(owner=push.owner)
    endpoint = hub_tokens.hub_endpoint(record)
    HubPush.objects.filter(pk=push.pk).update(endpoint=endpoint)
    job_log.job_log_append(job_id=push.job_id, lines=[(_STAGE, f"Pushing to {endpoint}/{push.repo_id}.")])
    token = ""
    try:
        if record is None:
            raise PushRefused("Your hub token was deleted before the push ran; set it again and push again.")
        token = hub_tokens.hub_token_reveal(record)
        pushed = _upload(push, token=token, endpoint=endpoint)
    except (PushRefused, hub_tokens.UnreadableToken, downloads.NotDownloadable) as exc:
        return _end(push, Status.RUNNING, error=str(exc), secret=token)
    except SoftTimeLimitExceeded:
        raise  # the task's failure hook records the time limit
    except Exception as exc:  # noqa: BLE001 - every hub or network failure ends the push in words
        logger.warning("Push %s to %s failed", push.pk, push.repo_id, exc_info=True)  # the traceback, no token
        return _end(push, Status.RUNNING, error=hub_error(exc, repo_id=push.repo_id, endpoint=endpoint), secret=token)
    return _end(push, Status.RUNNING, pushed=pushed)


def hub_push_fail(*, push_id: int, error: str) -> None:
    """The task's failure hook (time limit, a crash): a push still running ends failed with the reason."""
    push = HubPush.objects.filter(pk=push_id).first()
    if push is not None:
        _end(push, Status.RUNNING, error=error)


def hub_push_reap_stuck() -> list[int]:
    """Pushes still running past the task's hard time limit end failed: their worker died (the message a killed
    worker gives back finds the push claimed already, so nothing else would ever end it). Housekeeping calls it."""
    limit_s = settings.COMPRESSOR_HUB_PUSH_HARD_LIMIT_S
    cutoff = timezone.now() - timedelta(seconds=limit_s + _REAP_GRACE_S)
    stuck = list(HubPush.objects.filter(status=Status.RUNNING, started_at__lt=cutoff).values_list("pk", flat=True))
    for push_id in stuck:
        hub_push_fail(
            push_id=push_id,
            error=f"The worker pushing it stopped before the push ended (it is past its time limit of {limit_s} s); "
            "push again.",
        )
    return stuck


def _upload(push: HubPush, *, token: str, endpoint: str) -> Pushed:
    from huggingface_hub import HfApi

    job = push.job
    root = downloads.checkpoint_dir(job)
    paths = [entry["path"] for entry in job.manifest.get("files", [])]
    downloads.ensure_intact(job, root, paths)  # a damaged file is never published
    api = HfApi(endpoint=endpoint, token=token)
    _create_repo(api, push.repo_id, private=push.private)
    info = api.upload_folder(
        repo_id=push.repo_id,
        folder_path=root,
        allow_patterns=[*paths, downloads.MANIFEST_NAME],  # the manifest's files only, as the downloads
        commit_message=f"{job.recipe_label} of {job.model_source} (compression job {job.pk})",
    )
    return Pushed(commit_sha=info.oid, commit_url=info.commit_url)


def _create_repo(api, repo_id: str, *, private: bool) -> None:
    """create_repo, where an existing repository is fine (pushing again adds a commit).

    Not exist_ok=True: on a 401/403 answer that path builds the repository's URL without the endpoint and
    fails for any hub but huggingface.co (huggingface_hub 1.33). The same decision, made here: 409 means it
    exists; 403 (another namespace) goes on only when the repository exists, and the upload then says
    whether the token may write to it.
    """
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(repo_id, private=private, repo_type="model")
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 409 or (status == 403 and api.repo_exists(repo_id)):
            return
        raise


def hub_error(exc: BaseException, *, repo_id: str, endpoint: str) -> str:
    """A failure of the hub or the network in words a user can act on."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    later = "push again later, and tell an operator if it keeps failing"
    if isinstance(exc, OfflineModeIsEnabled):
        return f"The hub ({endpoint}) could not be reached: this server works offline (HF_HUB_OFFLINE); {later}."
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            return (
                f"The hub ({endpoint}) refused your token (401): it is wrong, expired or revoked. "
                "Set a new one with write access, then push again."
            )
        if status == 403:
            return (
                f"The hub refused to write to {repo_id} (403): your token may not write there (a repository "
                "or namespace of someone else, or a read-only token). Push to your own namespace, or use a "
                "token with write access to it."
            )
        said = (exc.server_message or "").strip().splitlines()
        return f"The hub answered {status} for {repo_id}: {said[0] if said else exc.response.reason_phrase}."
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return f"The hub ({endpoint}) did not answer in time; {later}."
    if isinstance(exc, httpx.ConnectError | ConnectionError):
        if _name_not_found(exc):
            return f"The hub ({endpoint}) could not be reached: this server finds no address for its name; {later}."
        return f"The hub ({endpoint}) could not be reached: nothing answered at its address; {later}."
    if isinstance(exc, httpx.TransportError):
        return f"The connection to the hub ({endpoint}) broke off during the push; {later}."
    # The traceback is in the worker's log (hub_push_run logs it); the user gets a sentence, not Python's words.
    return f"The push to {repo_id} stopped on an unexpected error; {later}."


def _name_not_found(exc: BaseException) -> bool:
    """Whether a connection failed on the host name (a DNS failure), anywhere in the exception's chain."""
    while exc is not None:
        if isinstance(exc, socket.gaierror):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _end(push: HubPush, expected: str, *, pushed: Pushed | None = None, error: str = "", secret: str = "") -> HubPush:
    """expected -> succeeded (with the commit) or failed (with the reason), and a line in the job's log."""
    error = redact_tokens(redact(error), secret)[:2000]
    fields = {"status": Status.FAILED, "error": error, "finished_at": timezone.now()}
    if pushed is not None:
        fields |= {"status": Status.SUCCEEDED, "commit_sha": pushed.commit_sha, "commit_url": pushed.commit_url}
    with transaction.atomic():
        if HubPush.objects.filter(pk=push.pk, status=expected).update(**fields):
            line = (
                f"Pushed to {push.repo_id}: commit {pushed.commit_sha[:12]} ({pushed.commit_url})."
                if pushed
                else f"Push to {push.repo_id} failed: {error}"
            )
            job_log.job_log_append(job_id=push.job_id, lines=[(_STAGE, line)])
    push.refresh_from_db()
    return push
