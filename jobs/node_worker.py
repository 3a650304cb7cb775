"""The worker's side of the registry (jobs.nodes), wired to Celery's signals in the worker's main process.

- celeryd_after_setup (after -Q is applied): a compute worker (gpu or cpu queue) also consumes its own queue,
  node.<its name>, where the routing sends jobs that only some workers can hold.
- worker_ready: a heartbeat thread starts. It measures the worker (engine.resources.detect_resources with
  the worker's caps; a gpu worker's GPUs once, in a child Python, so this process never initialises CUDA
  before it forks its pool children), announces it, then beats every COMPRESSOR_NODE_HEARTBEAT_S,
  measuring host memory and disk again while no job runs.
- worker_shutdown: the thread stops and the worker is marked offline.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown
from celery.worker import state as worker_state
from django.conf import settings
from django.core.files.storage import default_storage
from django.db import close_old_connections, connection

from engine.resources import Gpu, WorkerCaps, WorkerResources, detect_resources
from jobs import nodes
from jobs.models import Job

logger = logging.getLogger(__name__)

_GPU_CAPS = ("gpus", "gpu_memory")  # the caps engine.resources reports for the GPUs


class Heartbeat(threading.Thread):
    """Announces this worker, then beats until stopped (a daemon: it never holds the worker's exit up)."""

    def __init__(self, *, hostname: str, queues: list[str], caps: WorkerCaps, interval_s: float) -> None:
        super().__init__(name="node-heartbeat", daemon=True)
        self.hostname, self.queues, self.caps, self.interval_s = hostname, queues, caps, interval_s
        self.stopped = threading.Event()
        self._announced = False
        self._gpus: tuple[tuple[Gpu, ...], tuple[str, ...]] | None = None  # as measured first, and their caps

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - a database or measuring hiccup: try again at the next beat
                logger.warning("Worker registry: could not record %s", self.hostname, exc_info=True)
            finally:
                connection.close()  # no connection stays open for a pool child forked meanwhile to inherit
            self.stopped.wait(self.interval_s)

    def _beat(self) -> None:
        close_old_connections()
        folder = Path(default_storage.path("jobs"))  # the disk where checkpoints go
        if not self._announced:
            resources = self._measure(folder)
            nodes.node_announce(hostname=self.hostname, queues=self.queues, resources=resources, caps=self.caps)
            self._announced = True
            logger.info("Worker registry: %s announced %s", self.hostname, resources)
            return
        # Host memory and disk again while no job runs (a running job's own use is not the next job's limit).
        idle = not worker_state.active_requests
        measured = detect_resources(folder, device="cpu", caps=self.caps) if idle else None
        if not nodes.node_beat(hostname=self.hostname, resources=measured):
            self._announced = False  # its row is gone (deleted by an operator): announce again at once
            self._beat()

    def _measure(self, folder: Path) -> WorkerResources:
        """Everything the worker announces. The GPUs are measured once, by a child Python, and only for a gpu
        worker (a cpu worker's jobs never use one): their free memory before any job is what a job gets."""
        if self._gpus is None:
            device = "auto" if Job.DeviceClass.GPU in self.queues else "cpu"
            first = detect_resources(folder, device=device, caps=self.caps, gpus_in_child=True)
            self._gpus = (first.gpus, tuple(name for name in first.capped if name in _GPU_CAPS))
            return first
        now = detect_resources(folder, device="cpu", caps=self.caps)
        gpus, capped = self._gpus
        return dataclasses.replace(now, gpus=gpus, capped=now.capped + capped)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=10)


_worker: dict[str, object] = {}  # this process's worker: its name, queues, heartbeat (one worker per process)


@celeryd_after_setup.connect
def _consume_own_queue(sender: str, instance, **_kwargs) -> None:
    queues = instance.app.amqp.queues
    consumed = set(queues.consume_from)
    if consumed & nodes.COMPUTE_QUEUES:
        own = nodes.own_queue(sender)
        queues.select_add(own)
        consumed.add(own)
    _worker.update(hostname=sender, queues=sorted(consumed))


@worker_ready.connect
def _start_heartbeat(sender, **_kwargs) -> None:
    if "hostname" not in _worker:
        return  # a worker embedded without the worker program's set-up (celery.contrib.testing): not a node

    heartbeat = Heartbeat(
        hostname=str(_worker["hostname"]),
        queues=list(_worker["queues"]),
        caps=nodes.worker_caps(),
        interval_s=settings.COMPRESSOR_NODE_HEARTBEAT_S,
    )
    _worker["heartbeat"] = heartbeat
    heartbeat.start()


@worker_shutdown.connect
def _mark_offline(sender, **_kwargs) -> None:
    heartbeat = _worker.pop("heartbeat", None)
    if heartbeat is None:
        return
    heartbeat.stop()
    try:
        close_old_connections()
        nodes.node_offline(hostname=heartbeat.hostname)
    except Exception:  # noqa: BLE001 - its heartbeat stops anyway; it goes offline when the timeout passes
        logger.warning("Worker registry: could not mark %s offline", heartbeat.hostname, exc_info=True)
    finally:
        connection.close()
