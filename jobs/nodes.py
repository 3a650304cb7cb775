"""Several machines: the workers' registry and the choice of a queue whose workers can hold a job.

Each worker announces what it holds when it starts (node_announce: its queues, GPUs, host memory, disk,
measured by engine.resources with the operator's caps), beats every COMPRESSOR_NODE_HEARTBEAT_S
(node_beat) and says goodbye on a clean shutdown (node_offline). Each compute worker (gpu or cpu queue)
also consumes a queue of its own, `node.<its Celery name>`.

At submission (jobs.services.submissions.job_submit) and when a job is sent again (a lost worker, a lost message),
job_route sizes the job with the memory plan's own rules (engine.plan: the model's shape recorded from its
safetensors header at submission, the recipe, the calibration settings) against each registered worker
of the job's device class:
- no worker of that class ever registered (a fresh install): the shared queue, as before the registry;
- every online worker of the class can hold it (every registered one, when none is online): the shared
  queue (gpu or cpu), any of them takes it;
- some can: the own queue of one that can, online first, fewest active jobs first;
- none can: refused with the figures (needed, and what the largest worker has).
A job whose model has no safetensors header (pickle weights only) cannot be sized here: the shared queue.
"""

from __future__ import annotations

import dataclasses
import socket
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from django.conf import settings
from django.db.models import Count, Q
from django.utils import timezone

from engine.errors import PreflightError
from engine.model_sources import ModelFacts
from engine.plan import ModelFootprint, ModelShape, plan_memory, search_plan, shape_footprint
from engine.presets import PRESETS, recipe_names_hessians
from engine.resources import Gpu, WorkerCaps, WorkerResources
from engine.units import size_text
from jobs.compiled import ANY_ID, compiled_once, fetch_all, instances
from jobs.inputs import engine_device
from jobs.models import NODE_QUEUE_PREFIX, Job, WorkerNode, own_queue

COMPUTE_QUEUES = frozenset(Job.DeviceClass.values)  # compute queues are named after the device class


# --- the registry (the worker's side) ----------------------------------------------------------------------


def worker_caps() -> WorkerCaps:
    """The operator's caps on this worker's resources, for the engine's memory plan (settings.COMPRESSOR_WORKER_*)."""
    return WorkerCaps(
        host_ram_mb=settings.COMPRESSOR_WORKER_HOST_RAM_MB,
        gpu_memory_mb=settings.COMPRESSOR_WORKER_GPU_MEMORY_MB,
        gpus=settings.COMPRESSOR_WORKER_GPUS,
        disk_mb=settings.COMPRESSOR_WORKER_DISK_MB,
        data_parallel=settings.COMPRESSOR_WORKER_DATA_PARALLEL,
    )


def node_announce(*, hostname: str, queues: Iterable[str], resources: WorkerResources, caps: WorkerCaps) -> WorkerNode:
    """Record (or renew) a worker that has just started, with what it measured."""
    now = timezone.now()
    node, _ = WorkerNode.objects.update_or_create(
        hostname=hostname,
        defaults={
            "node": socket.gethostname(),
            "queues": sorted(set(queues)),
            "caps": dataclasses.asdict(caps),
            "started_at": now,
            "heartbeat_at": now,
            "stopped_at": None,
            **_figures(resources),
        },
    )
    return node


def node_beat(*, hostname: str, resources: WorkerResources | None = None) -> bool:
    """A worker's heartbeat, with its host memory and disk measured again when given; False when it has no row
    (deleted by an operator, or never announced): the worker then announces itself again."""
    fields = {"heartbeat_at": timezone.now(), "stopped_at": None}
    if resources is not None:
        fields.update(host_ram_bytes=resources.host_ram_bytes, disk_free_bytes=resources.disk_free_bytes)
    return bool(WorkerNode.objects.filter(hostname=hostname).update(**fields))


def node_offline(*, hostname: str) -> None:
    """A worker shutting down cleanly: offline at once (a crashed one goes offline when its heartbeat stops)."""
    WorkerNode.objects.filter(hostname=hostname).update(stopped_at=timezone.now())


def _figures(resources: WorkerResources) -> dict:
    return {
        "gpus": [{"index": g.index, "name": g.name, "memory_bytes": g.free_bytes} for g in resources.gpus],
        "host_ram_bytes": resources.host_ram_bytes,
        "disk_free_bytes": resources.disk_free_bytes,
        "capped": list(resources.capped),
    }


def node_resources(node: WorkerNode, *, device_class: str) -> WorkerResources:
    """What a job of this device class gets on the node, as the node announced it (a CPU job uses no GPU)."""
    announced = tuple(Gpu(g["index"], g["name"], g["memory_bytes"]) for g in node.gpus)
    gpus = () if device_class == Job.DeviceClass.CPU else announced
    return WorkerResources(
        host_ram_bytes=node.host_ram_bytes, disk_free_bytes=node.disk_free_bytes, gpus=gpus, capped=tuple(node.capped)
    )


# --- the job's needs ---------------------------------------------------------------------------------


def facts_with_shape(facts: ModelFacts) -> dict:
    """What the job records of its model at submission: the facts' summary, and the shape the routing sizes."""
    return {**facts.summary(), "shape": facts.shape.to_dict() if facts.shape else None}


def job_footprint(job: Job) -> ModelFootprint | None:
    """The job's footprint by the memory plan's rules, from what was recorded at submission; None when the
    model could not be sized there (no safetensors header)."""
    shape = (job.model_facts or {}).get("shape")
    if not shape:
        return None
    preset = PRESETS.get(job.preset) if job.preset else None
    # A custom recipe's need for data is llm-compressor's to judge (in the worker): counted when data is given.
    calibrates = preset.needs_calibration if preset else job.calibration_kind != Job.CalibrationKind.NONE
    return shape_footprint(
        ModelShape.from_dict(shape),
        hessians=bool(job.resolved_recipe) and recipe_names_hessians(job.resolved_recipe),
        samples=job.calibration_samples if calibrates else 0,
        max_seq_len=job.calibration_max_seq_len,
    )


# --- the choice of a queue ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A registered worker of the job's device class, as the routing weighs it."""

    hostname: str
    resources: WorkerResources
    online: bool
    active_jobs: int = 0


@dataclass(frozen=True)
class Route:
    queue: str
    why: str = ""  # a log line for the job: why this queue


def choose_queue(
    *,
    device_class: str,
    footprint: ModelFootprint | None,
    candidates: list[Candidate],
    gpus: int | None = None,
    search: bool = False,
    back_to: str | None = None,
) -> Route:
    """The queue for a job (see the module's docstring); PreflightError when no registered worker can hold it.

    gpus: how many GPUs the job asks for (a worker with fewer cannot hold it); None: as many as the plan needs.
    search: a floor search or a sweep, sized by its own plan (engine.plan.search_plan).
    back_to: the worker whose disk holds the layers the job's interrupted run compressed (engine.layer_resume): its
    own queue while it is online and can hold the job, so that the next attempt resumes from them.
    """
    holder = next((c for c in candidates if c.hostname == back_to and c.online), None)
    if holder and (footprint is None or _refusal(holder, footprint, device_class, gpus, search) is None):
        return Route(own_queue(holder.hostname), f"Sent back to {holder.hostname}, which holds its compressed layers.")
    if not candidates or footprint is None:
        return Route(device_class)
    refusals = {c.hostname: _refusal(c, footprint, device_class, gpus, search) for c in candidates}
    able = [c for c in candidates if refusals[c.hostname] is None]
    if not able:
        raise _nobody_can(device_class, candidates, refusals)
    # Those that take from the shared queue now: the online ones, or (none online) whoever comes back first.
    takers = [c for c in candidates if c.online] or candidates
    if all(refusals[c.hostname] is None for c in takers):
        return Route(device_class)
    chosen = min(able, key=lambda c: (not c.online, c.active_jobs, c.hostname))
    state = "" if chosen.online else " (offline now: the job waits for it)"
    unable = sorted(name for name, refusal in refusals.items() if refusal is not None)
    return Route(
        own_queue(chosen.hostname),
        f"Sent to {chosen.hostname}{state}: the {device_class} workers {', '.join(unable)} cannot hold this job.",
    )


def _refusal(
    candidate: Candidate, footprint: ModelFootprint, device_class: str, gpus: int | None, search: bool
) -> PreflightError | None:
    """Why this worker cannot hold the job (the memory plan's own refusal), or None when it can."""
    plan = search_plan if search else plan_memory
    try:
        plan(footprint, candidate.resources, device=engine_device(device_class), gpus=gpus)
    except PreflightError as exc:
        return exc
    return None


def _nobody_can(device_class: str, candidates: list[Candidate], refusals: dict) -> PreflightError:
    largest = max(candidates, key=_size_order)
    refusal = refusals[largest.hostname]
    resources = largest.resources
    gpu_text = ", ".join(f"{g.name or f'GPU {g.index}'} {size_text(g.free_bytes)}" for g in resources.gpus)
    has = f"{size_text(resources.host_ram_bytes)} host memory, {size_text(resources.disk_free_bytes)} disk" + (
        f", {gpu_text}" if gpu_text else ", no GPU"
    )
    return PreflightError(
        f"No {device_class} worker here can hold this job. The largest, {largest.hostname} ({has}), refuses it: "
        f"{refusal.message}",
        field=refusal.field or "model",
    )


def _size_order(candidate: Candidate) -> tuple[int, int, int, int]:
    resources = candidate.resources
    best_gpu = max((g.free_bytes for g in resources.gpus), default=0)
    return (len(resources.gpus), best_gpu, resources.host_ram_bytes, resources.disk_free_bytes)


def job_route(job: Job, *, back_to: str | None = None) -> Route:
    """The queue for this job among the registered workers of its device class; PreflightError when none can
    hold it (see the module's docstring and choose_queue)."""
    nodes = [n for n in instances(WorkerNode, _registered_nodes, {}) if job.device_class in n.queues]
    if not nodes:
        return Route(job.device_class)  # nobody registered yet: the shared queue, whoever comes first
    return choose_queue(
        device_class=job.device_class,
        footprint=job_footprint(job),
        candidates=_candidates(nodes, job),
        gpus=job.gpus,
        search=bool(job.search),
        back_to=back_to,
    )


@compiled_once
def _registered_nodes():
    return WorkerNode.objects.all()


def job_reroute(job: Job, *, back_to: str | None = None) -> Route:
    """The queue for a job that is sent again: routed afresh when it was on a compute or node queue (its node
    may be gone; back_to as for choose_queue); a job no registered worker can hold any more goes to its device
    class's queue."""
    if job.queue not in COMPUTE_QUEUES and not job.queue.startswith(NODE_QUEUE_PREFIX):
        return Route(job.queue)  # a queue an operator or a test chose: left alone
    try:
        return job_route(job, back_to=back_to)
    except PreflightError as exc:
        return Route(job.device_class, f"No registered worker can hold it now ({exc.message})")


def _host_placeholders(count: int) -> list[str]:
    return [f"<host-{index}>" for index in range(count)]


@compiled_once
def _active_on_nodes(count: int):
    """The jobs running on, or waiting in the own queue of, `count` workers (placeholders), but one job."""
    hostnames = _host_placeholders(count)
    running_or_waiting = Q(status=Job.Status.RUNNING, worker__in=hostnames) | Q(
        status=Job.Status.QUEUED, queue__in=[own_queue(name) for name in hostnames]
    )
    # Counted by the database: one row per (status, worker, queue), however many jobs wait (a burst of
    # submissions fills a node's queue, and each of them routes the next).
    jobs = Job.objects.filter(running_or_waiting).exclude(pk=ANY_ID)
    return jobs.values_list("status", "worker", "queue").annotate(jobs=Count("id")).order_by()


def _candidates(nodes: list[WorkerNode], job: Job) -> list[Candidate]:
    now = timezone.now()
    hostnames = [n.hostname for n in nodes]
    places: dict[object, object] = {ANY_ID: job.pk or 0}  # a job sent again is not behind itself (0: no job)
    for placeholder, hostname in zip(_host_placeholders(len(hostnames)), hostnames, strict=True):
        places[placeholder], places[own_queue(placeholder)] = hostname, own_queue(hostname)
    counts: Counter[str] = Counter()
    for status, worker, queue, jobs in fetch_all(_active_on_nodes, places, len(hostnames)):
        counts[worker if status == Job.Status.RUNNING else queue.removeprefix(NODE_QUEUE_PREFIX)] += jobs
    return [
        Candidate(
            hostname=n.hostname,
            resources=node_resources(n, device_class=job.device_class),
            online=n.is_online(now),
            active_jobs=counts[n.hostname],
        )
        for n in nodes
    ]
