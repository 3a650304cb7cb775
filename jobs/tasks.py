"""Celery tasks: thin. Load the job by id, call the engine, record the outcome through jobs.services.

The compress task is safe to deliver twice (acks_late, redelivery after a lost worker): it first claims
its job with a conditional UPDATE QUEUED -> RUNNING for its own task id, and returns when that changes
no row (cancelled, claimed elsewhere, or a stale message after a priority change or re-queue).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
import threading
import time
import traceback
from enum import StrEnum
from pathlib import Path

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init
from django.conf import settings
from django.core.files.storage import default_storage

from engine.errors import CancelledError, EngineError
from jobs import services
from jobs.models import Job
from jobs.progress import JobProgress

logger = logging.getLogger(__name__)


class Queue(StrEnum):
    GPU = "gpu"  # compression on a GPU worker (one per GPU, concurrency 1)
    CPU = "cpu"  # compression on a CPU-only worker
    LIGHT = "light"  # housekeeping: the reaper, stopping cancelled jobs


class JobTask(Task):
    """Records an unexpected error on the job in plain words (expected ones are handled in the task)."""

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        job_id = args[0] if args else kwargs.get("job_id")
        if job_id is None:
            return
        services.job_fail(
            job_id=job_id,
            error=f"The worker hit an unexpected error and stopped: {type(exc).__name__}: {exc}",
            log_lines=[("", str(einfo))],
        )


@shared_task(
    bind=True,
    base=JobTask,
    name="jobs.compress",  # routed to "gpu" by settings.CELERY_TASK_ROUTES; job_submit picks gpu or cpu
    acks_late=True,
    reject_on_worker_lost=True,
    # The soft limit raises SoftTimeLimitExceeded in the task: it records "took too long" and cleans up.
    # The hard limit kills the child if even that hangs. Both are below the Redis visibility timeout
    # (settings.CELERY_BROKER_TRANSPORT_OPTIONS), or Redis would hand the running job to a second worker.
    soft_time_limit=settings.COMPRESSOR_JOB_SOFT_LIMIT_S,
    time_limit=settings.COMPRESSOR_JOB_HARD_LIMIT_S,
    ignore_result=True,
)
def compress_job(self, job_id: int) -> None:
    job = services.job_start(job_id=job_id, task_id=self.request.id, worker=self.request.hostname or "")
    if job is None:
        logger.info("Job %s is not waiting for task %s (cancelled or taken); nothing to do", job_id, self.request.id)
        return
    services.job_remove_artifacts(job=job)  # leftovers of an earlier run of this job (re-queued)
    relpath = job.artifacts_relpath()
    out_dir = Path(default_storage.path(relpath))
    progress = JobProgress(job_id=job.pk, interval_s=settings.COMPRESSOR_HEARTBEAT_INTERVAL_S)
    progress.start()
    try:
        from engine.runner import compress

        device = "cpu" if job.device_class == Job.DeviceClass.CPU else "auto"
        result = compress(job.to_spec(device=device), out_dir, progress=progress, should_cancel=progress.should_cancel)
    except CancelledError:
        progress.close()
        services.job_remove_artifacts(job=job)
        # Normally the job is already cancelled; this only acts if it is somehow still running.
        services.job_fail(job_id=job.pk, error="The job stopped because it was cancelled.")
    except SoftTimeLimitExceeded:
        progress.close()
        services.job_remove_artifacts(job=job)
        limit_h = settings.COMPRESSOR_JOB_SOFT_LIMIT_S / 3600
        services.job_fail(job_id=job.pk, error=f"The job ran longer than its time limit of {limit_h:g} h.")
    except EngineError as exc:
        progress.close()
        services.job_remove_artifacts(job=job)
        services.job_fail(job_id=job.pk, error=exc.message, log_lines=[("", traceback.format_exc())])
    except BaseException:
        progress.close()
        services.job_remove_artifacts(job=job)
        raise  # JobTask.on_failure records it
    else:
        progress.close()
        results = result.to_dict()
        results["output_dir"] = relpath
        if not services.job_finish(job_id=job.pk, results=results, manifest=result.manifest, artifacts_path=relpath):
            services.job_remove_artifacts(job=job)  # cancelled at the last moment: nobody will download it
    finally:
        _free_device_memory()


@shared_task(name="jobs.stop_cancelled", ignore_result=True)  # the "light" queue (CELERY_TASK_ROUTES)
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
    services.job_remove_artifacts(job=job)


@shared_task(name="jobs.reap_stale_jobs", ignore_result=True)  # the "light" queue (CELERY_TASK_ROUTES)
def reap_stale_jobs() -> None:
    for job_id, action in services.job_reap_stale():
        logger.warning("Reaper: job %s %s (no heartbeat)", job_id, action)


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

    threading.Thread(target=preload, name="preload-engine", daemon=True).start()


@shared_task(name="jobs.expire_artifacts", ignore_result=True)  # the "light" queue, hourly (CELERY_BEAT_SCHEDULE)
def expire_artifacts() -> None:
    expired = services.artifacts_expire()
    if expired.jobs or expired.uploads:
        logger.info("Retention: deleted jobs %s and uploads %s", expired.jobs, expired.uploads)
