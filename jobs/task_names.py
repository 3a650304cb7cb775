"""The names of the Celery tasks and queues: the one home of them. jobs.tasks registers each task under its
name, the settings route and schedule by them, jobs.dispatch sends by them, the pages and tests list the
queues from here. No imports from the project: the settings read this module before Django is set up."""

from __future__ import annotations

from enum import StrEnum

COMPRESS = "jobs.compress"
STOP_CANCELLED = "jobs.stop_cancelled"
PUSH_TO_HUB = "jobs.push_to_hub"
REAP_STALE_JOBS = "jobs.reap_stale_jobs"
HOUSEKEEPING = "jobs.housekeeping"
EXPIRE_ARTIFACTS = "jobs.expire_artifacts"


class Queue(StrEnum):
    GPU = "gpu"  # compression on a GPU worker (one per GPU, concurrency 1)
    CPU = "cpu"  # compression on a CPU-only worker
    LIGHT = "light"  # housekeeping: the reaper, stopping cancelled jobs, hub pushes


QUEUE_NAMES = tuple(queue.value for queue in Queue)
