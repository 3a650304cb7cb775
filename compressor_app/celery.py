"""The Celery app: configured from Django settings (CELERY_* names), tasks found in each app's tasks.py.

Run a worker per GPU, pinned and one job at a time:
    CUDA_VISIBLE_DEVICES=0 celery -A compressor_app worker -Q gpu -c 1 -n gpu0@%h
a CPU-only worker for CPU jobs (device_class "cpu"):
    celery -A compressor_app worker -Q cpu -c 1 -n cpu@%h
and one light worker with the embedded beat for housekeeping (the reaper, the sweeper of lost messages,
the removal of temporary folders of runs that are over):
    celery -A compressor_app worker -Q light -c 1 -B -n light@%h

Each worker announces itself to the registry (jobs.nodes: its queues, GPUs, host memory, disk, heartbeat); a
gpu or cpu worker also consumes a queue of its own, node.<its -n name>, for the jobs only it can hold.

Worker children stay warm between jobs; settings.CELERY_WORKER_MAX_MEMORY_PER_CHILD (from
COMPRESSOR_WORKER_MAX_MEMORY_MB) replaces one that held too much memory during a job, and jobs.tasks
replaces one whose job did not succeed.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "compressor_app.settings")

app = Celery("compressor_app")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
