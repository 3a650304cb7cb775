"""Celery tasks: thin. Load the job by id, call the engine, record the outcome through jobs.services.

The compress task is safe to deliver twice (acks_late, redelivery after a lost worker): it first claims
its job with a conditional UPDATE QUEUED -> RUNNING for its own task id, and returns when that changes
no row (cancelled, claimed elsewhere, or a stale message after a priority change or re-queue).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from celery.signals import worker_process_init
from celery.worker.request import Request
from django.conf import settings
from django.db import close_old_connections

from engine.errors import CancelledError, EngineError
from engine.model_cache import ModelCache
from jobs import artifact_store, nodes, task_names
from jobs.dispatch import BROKER_ERRORS
from jobs.inputs import job_spec
from jobs.models import Job
from jobs.progress import JobProgress
from jobs.resume_folders import job_take_resume_folder
from jobs.services import lifecycle, recovery, retention, storage

logger = logging.getLogger(__name__)


class JobRequest(Request):
    """The worker's main process side of one job message.

    A job that did not end well (cancelled, time limit, out of memory, crash) may leave things behind in
    its process that the next job must not inherit: device memory, hooks and half-done llm-compressor
    state, a heap grown by a failed allocation. Its child process is replaced before the message is
    acknowledged, so no next job can have reached that child yet. A job that succeeded keeps its child
    warm (worker_max_memory_per_child recycles one that grew too big).
    """

    def acknowledge(self) -> None:
        # Celery acknowledges a job's message (acks_late) from the main process once its run ended.
        self._retire_child_after_a_bad_end()
        super().acknowledge()

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        exc = getattr(exc_info.exception, "exc", exc_info.exception)  # unwrap ExceptionWithTraceback
        if isinstance(exc, WorkerLostError) and self.args:
            # The child died (SIGKILL, the kernel's OOM killer): act now rather than after the heartbeat
            # timeout. Celery gives the message back too; its copy then finds the job re-queued or failed.
            close_old_connections()
            action = recovery.job_worker_lost(job_id=self.args[0], task_id=self.id, reason=f"process died ({exc})")
            logger.warning("Job %s: its worker process died; %s", self.args[0], action or "nothing to do")
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def _retire_child_after_a_bad_end(self) -> None:
        pid = self.worker_pid
        if not pid or pid == os.getpid() or not self.args:
            return  # solo or threads pool: there is no child of its own to replace
        close_old_connections()
        ended_badly = Job.objects.filter(
            pk=self.args[0],
            celery_task_id=self.id,
            started_at__isnull=False,
            status__in=(Job.Status.FAILED, Job.Status.CANCELLED),
        ).exists()
        if ended_badly:
            logger.info("Replacing worker child %s after job %s ended badly", pid, self.args[0])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


class JobTask(Task):
    """Records an unexpected error on the job in plain words (expected ones are handled in the task).

    on_failure also runs in the worker's main process when the hard time limit killed the child.
    """

    Request = JobRequest

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        job_id = args[0] if args else kwargs.get("job_id")
        if job_id is None:
            return
        if isinstance(exc, TimeLimitExceeded):
            limit = exc.args[0] if exc.args else settings.COMPRESSOR_JOB_HARD_LIMIT_S
            error = lifecycle.time_limit_error(float(limit))
            # The child is being killed right now; housekeeping removes the temporary folder it leaves.
            lifecycle.job_fail(job_id=job_id, task_id=task_id, error=error)
            return
        lifecycle.job_fail(
            job_id=job_id,
            task_id=task_id,
            error=f"The worker hit an unexpected error and stopped: {type(exc).__name__}: {exc}",
            log_lines=[("", str(einfo))],
        )


@shared_task(
    bind=True,
    base=JobTask,
    name=task_names.COMPRESS,  # routed to "gpu" by settings.CELERY_TASK_ROUTES; job_submit picks gpu or cpu
    acks_late=True,
    reject_on_worker_lost=True,
    # The soft limit raises SoftTimeLimitExceeded in the task: it records "time limit" and cleans up.
    # The hard limit kills the child if even that hangs (JobTask.on_failure records it). Both are below the
    # Redis visibility timeout (settings.CELERY_BROKER_TRANSPORT_OPTIONS), or Redis would hand the running
    # job to a second worker (the claim would stop that second run, but the limit would be meaningless).
    soft_time_limit=settings.COMPRESSOR_JOB_SOFT_LIMIT_S,
    time_limit=settings.COMPRESSOR_JOB_HARD_LIMIT_S,
    ignore_result=True,
)
def compress_job(self, job_id: int) -> None:
    task_id = self.request.id
    job = lifecycle.job_start(job_id=job_id, task_id=task_id, worker=self.request.hostname or "")
    if job is None:
        logger.info("Job %s is not waiting for task %s (cancelled or taken); nothing to do", job_id, task_id)
        return
    # Leftovers of an earlier run of this job (re-queued), but not the layers it compressed: this run resumes.
    storage.job_remove_artifacts(job=job, keep_resume=True)
    resume_dir = job_take_resume_folder(job=job)
    relpath = job.artifacts_relpath()
    progress = JobProgress(job_id=job.pk, task_id=task_id, interval_s=settings.COMPRESSOR_HEARTBEAT_INTERVAL_S)
    progress.start()
    # A failed job keeps the layers it compressed for its retry (jobs.resume_folders); a cancelled one does not.
    error, log_lines, keep_resume = "", [], True
    try:
        # Inside the try: a time limit that runs out while the engine still imports is the job's time limit.
        _wait_for_preload()
        logger.info("Job %s: %s", job_id, thread_settings())
        # The job's hub model stays leased in the node's model cache until the run is over.
        with _soft_limit_noticed_by(progress), _model_cache(progress) as model_cache:
            from engine.runner import compress

            out_dir = artifact_store.work_folder(job)
            spec = job_spec(job)
            result = compress(
                spec,
                out_dir,
                progress=progress,
                should_cancel=progress.should_cancel,
                caps=nodes.worker_caps(),
                model_cache=model_cache,
                resume_dir=resume_dir,
            )
            artifact_store.publish(job, out_dir, result.manifest, log=progress.log)
    except SoftTimeLimitExceeded:
        error = lifecycle.time_limit_error(_soft_limit_s(self.request))
    except CancelledError:
        # Normally the job is already cancelled and job_fail changes nothing; out of time, it records that.
        error = "The job stopped because it was cancelled."
        keep_resume = progress.out_of_time
        if progress.out_of_time:
            error = lifecycle.time_limit_error(_soft_limit_s(self.request))
    except EngineError as exc:
        error, log_lines = exc.message, [("", traceback.format_exc())]
    except Exception as exc:
        error = _resource_failure(exc)
        if error is None:
            _end_run(progress, job_id, task_id, keep_resume=True)
            raise  # JobTask.on_failure records it
        log_lines = [("", traceback.format_exc())]
    else:
        progress.close()
        results = result.to_dict()
        results["output_dir"] = relpath
        finished = lifecycle.job_finish(
            job_id=job.pk, task_id=task_id, results=results, manifest=result.manifest, artifacts_path=relpath
        )
        if not finished:  # cancelled at the last moment, or no longer this run's job: nobody will download it
            lifecycle.job_discard_run_output(job_id=job.pk, task_id=task_id)
        _free_device_memory()
        return
    _end_run(progress, job_id, task_id, keep_resume=keep_resume)
    lifecycle.job_fail(job_id=job.pk, task_id=task_id, error=error, log_lines=log_lines)


def _model_cache(progress: JobProgress) -> ModelCache:
    """This node's cache of hub models (settings.COMPRESSOR_MODEL_CACHE_*), speaking on the job's log."""
    return ModelCache(
        settings.COMPRESSOR_MODEL_CACHE_DIR,
        limit_mb=settings.COMPRESSOR_MODEL_CACHE_MB,
        log=progress.log,
        should_cancel=progress.should_cancel,
    )


def _soft_limit_s(request) -> float:
    """The soft limit this run had (a message may carry its own), for the error message."""
    _hard, soft = request.timelimit or (None, None)
    return float(soft or settings.COMPRESSOR_JOB_SOFT_LIMIT_S)


def _end_run(progress: JobProgress, job_id: int, task_id: str, *, keep_resume: bool) -> None:
    """After a run that did not succeed: stop the heartbeat, remove its output, give memory back."""
    progress.close()
    lifecycle.job_discard_run_output(job_id=job_id, task_id=task_id, keep_resume=keep_resume)
    _free_device_memory()


@contextlib.contextmanager
def _soft_limit_noticed_by(progress: JobProgress) -> Iterator[None]:
    """Tell the progress recorder when the soft time limit fires, then let Celery raise as usual.

    Celery raises SoftTimeLimitExceeded wherever the task happens to be; a library's broad
    `except Exception` (lm-eval tasks, datasets) may swallow it. The recorder then stops the engine at its
    next step, and the job still ends "failed: time limit" instead of running on to the hard limit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers live on the main thread (the prefork and solo pools run tasks there)
        return
    previous = signal.getsignal(signal.SIGUSR1)

    def on_soft_limit(signum, frame) -> None:
        progress.time_is_up()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGUSR1, on_soft_limit)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


_OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "cannot allocate memory")
_DISK_FULL = ("no space left on device", "os error 28", "code: 28")


def _resource_failure(exc: BaseException) -> str | None:
    """A plain-words reason for running out of memory or disk (anywhere in the exception's chain)."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    text = " ".join(str(e).lower() for e in chain)
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain) or any(m in text for m in _DISK_FULL):
        return (
            "No space left on device while writing the checkpoint. Free some space where checkpoints are "
            "stored (or remove old jobs), then retry."
        )
    if any(isinstance(e, MemoryError) for e in chain) or any(m in text for m in _OUT_OF_MEMORY):
        return (
            f"The job ran out of memory ({type(chain[0]).__name__}: {str(chain[0])[:200]}). Try fewer "
            "calibration samples or a shorter maximum sequence length, a smaller model, or a worker with more "
            "memory."
        )
    return None


@shared_task(name=task_names.STOP_CANCELLED, ignore_result=True)  # the "light" queue (CELERY_TASK_ROUTES)
def stop_cancelled_job(job_id: int) -> None:
    """The fallback after a cancel: if the job's task still runs, terminate its worker child."""
    from compressor_app.celery import app
    from jobs.selectors import active_task_ids

    job = Job.objects.filter(pk=job_id, status=Job.Status.CANCELLED).first()
    if job is None or not job.celery_task_id:
        return
    if job.celery_task_id in active_task_ids():
        logger.warning("Job %s did not stop after cancel; terminating task %s", job_id, job.celery_task_id)
        app.control.revoke(job.celery_task_id, terminate=True, signal="SIGTERM")
        time.sleep(2)  # let the child die before its output folder goes
    storage.job_remove_artifacts(job=job)


@shared_task(name=task_names.REAP_STALE_JOBS, ignore_result=True)  # the "light" queue (CELERY_TASK_ROUTES)
def reap_stale_jobs() -> None:
    for job_id, action in recovery.job_reap_stale():
        logger.warning("Reaper: job %s %s (no heartbeat)", job_id, action)


@shared_task(name=task_names.HOUSEKEEPING, ignore_result=True)  # the "light" queue (CELERY_TASK_ROUTES)
def housekeeping() -> None:
    """Send queued jobs again whose message was lost or whose worker went offline; remove temporary folders
    of runs that are over; end pushes whose worker died."""
    try:
        for job_id in recovery.job_sweep_stranded():
            logger.warning("Sweeper: job %s had lost its queue message; sent again", job_id)
        for job_id in recovery.job_reroute_from_offline_nodes():
            logger.warning("Sweeper: job %s waited for an offline worker; routed again", job_id)
    except BROKER_ERRORS as exc:
        logger.warning("Sweeper: the queue does not answer (%s); trying again next time", exc)
    for path in retention.job_remove_stale_partials():
        logger.warning("Housekeeping: removed the temporary folder %s of a run that is over", path)
    from jobs.hub_push import hub_push_reap_stuck

    for push_id in hub_push_reap_stuck():
        logger.warning("Housekeeping: push %s was still running past its time limit; ended failed", push_id)


def _free_device_memory() -> None:
    """Give GPU and host memory back after each job while keeping the worker child (and its imports) warm."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    _trim_host_heap()


def _trim_host_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise, and the worker's RSS grows job by job)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl, macOS): nothing to trim
        pass


_preloading: list[threading.Thread] = []  # the preload thread of this worker child, while it runs


def _wait_for_preload() -> None:
    """A job that arrives while the child still preloads waits for it: importing llm-compressor on two threads
    at once fails ("partially initialized module", its packages import each other)."""
    while _preloading:
        _preloading.pop().join()


def thread_settings() -> str:
    """The threads torch computes with in this process, and what decided them: for the worker's log."""
    import torch

    env = ", ".join(f"{name}={os.environ.get(name, 'unset')}" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))
    return (
        f"torch intra-op threads {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}, "
        f"{len(os.sched_getaffinity(0))} cores usable ({env})"
    )


@worker_process_init.connect
def _preload_engine(**_kwargs) -> None:
    """Import torch, transformers and llm-compressor in each new worker child, in the background.

    A warm child starts its first job seconds sooner. A thread, because Celery gives a child only a few
    seconds to report ready. Light workers set COMPRESSOR_WORKER_PRELOAD=false.
    """
    if not settings.COMPRESSOR_WORKER_PRELOAD or os.environ.get("COMPRESSOR_WORKER_PRELOAD") == "false":
        return

    def preload() -> None:
        try:
            import llmcompressor  # noqa: F401
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except Exception:  # noqa: BLE001 - the first job will report the real import error
            logger.exception("Preloading the engine failed")
            return
        # The imports' objects live as long as the child: out of the collector's sight, a job's full collections
        # walk only what the jobs made. Django, torch, transformers and llm-compressor leave ~550 000 objects; a
        # full collection of them took 0.9 s on the loaded 2-core VM, after gc.freeze ~0 (oneshot_profile.md).
        gc.freeze()
        logger.info("Engine preloaded (%s objects frozen); %s", gc.get_freeze_count(), thread_settings())

    thread = threading.Thread(target=preload, name="preload-engine", daemon=True)
    _preloading.append(thread)
    thread.start()


@shared_task(name=task_names.EXPIRE_ARTIFACTS, ignore_result=True)  # the "light" queue, hourly (CELERY_BEAT_SCHEDULE)
def expire_artifacts() -> None:
    expired = retention.artifacts_expire()
    if expired.jobs or expired.uploads:
        logger.info("Retention: deleted jobs %s and uploads %s", expired.jobs, expired.uploads)


class PushTask(Task):
    """A push that the time limit or an unexpected error stopped ends failed, with the reason."""

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        from jobs.hub_push import hub_push_fail

        push_id = args[0] if args else kwargs.get("push_id")
        if push_id is None:
            return
        if isinstance(exc, SoftTimeLimitExceeded | TimeLimitExceeded):
            error = f"The push ran into its time limit of {settings.COMPRESSOR_HUB_PUSH_SOFT_LIMIT_S} s and stopped."
        else:
            error = f"The worker hit an unexpected error and stopped: {type(exc).__name__}: {exc}"
        hub_push_fail(push_id=push_id, error=error)


@shared_task(
    base=PushTask,
    name=task_names.PUSH_TO_HUB,  # the "light" queue (CELERY_TASK_ROUTES; jobs.hub_push sends it there too)
    # A push is claimed (queued -> running) before it starts, so a redelivered message does nothing.
    acks_late=True,
    # The soft limit raises in the task (the failure hook records it); the hard one kills a stuck child.
    soft_time_limit=settings.COMPRESSOR_HUB_PUSH_SOFT_LIMIT_S,
    time_limit=settings.COMPRESSOR_HUB_PUSH_HARD_LIMIT_S,
    ignore_result=True,
)
def push_to_hub(push_id: int) -> None:
    """Upload a succeeded job's checkpoint and card to the hub repository its push names (jobs.hub_push)."""
    from jobs.hub_push import hub_push_run

    push = hub_push_run(push_id=push_id)
    if push is None:
        logger.info("Push %s is not waiting (pushed already or redelivered); nothing to do", push_id)
