"""The registry of Celery workers: what each announced when it started (queues, GPUs, host memory, disk, its
caps) and its heartbeat. Written only by jobs.nodes; read by the routing at submission and the admin.

Imported by jobs.models, so the model belongs to the jobs app.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

NODE_QUEUE_PREFIX = "node."


def own_queue(hostname: str) -> str:
    """The queue only this worker consumes."""
    return f"{NODE_QUEUE_PREFIX}{hostname}"


class WorkerNode(models.Model):
    hostname = models.CharField(max_length=200, unique=True, help_text="The Celery worker's name (-n), e.g. gpu0@host.")
    node = models.CharField(max_length=200, help_text="The machine's hostname.")
    queues = models.JSONField(default=list, help_text="The queues it consumes, its own included.")
    gpus = models.JSONField(default=list, help_text="Each GPU it may use: index, name, free memory (bytes).")
    host_ram_bytes = models.PositiveBigIntegerField(default=0, help_text="Host memory available to a job.")
    disk_free_bytes = models.PositiveBigIntegerField(default=0, help_text="Free disk where checkpoints go.")
    caps = models.JSONField(default=dict, help_text="The operator's caps (COMPRESSOR_WORKER_*, decimal MB).")
    capped = models.JSONField(default=list, help_text="Which figures a cap lowered.")
    started_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField()
    stopped_at = models.DateTimeField(null=True, blank=True, help_text="Set by a clean shutdown.")

    class Meta:
        ordering = ["hostname"]

    def __str__(self) -> str:
        return self.hostname

    @property
    def own_queue(self) -> str:
        return own_queue(self.hostname)

    def is_online(self, now: datetime | None = None) -> bool:
        """Running: not shut down, and a heartbeat younger than COMPRESSOR_NODE_OFFLINE_AFTER_S."""
        cutoff = (now or timezone.now()) - timedelta(seconds=settings.COMPRESSOR_NODE_OFFLINE_AFTER_S)
        return self.stopped_at is None and self.heartbeat_at >= cutoff
