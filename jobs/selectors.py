"""Reads: which jobs a user may see, queue positions, log pages, and what the workers and queues hold."""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from django.db.models import Count, QuerySet
from django.shortcuts import get_object_or_404

from engine.units import size_text
from jobs.models import CalibrationDataset, Job, JobLogLine, WorkerNode
from jobs.task_names import COMPRESS, QUEUE_NAMES

logger = logging.getLogger(__name__)

# The order workers take waiting jobs in: priority (9 first), then submission time, then id. The one home of
# it: the lists, the job page, the API and the admin all number waiting jobs through the functions below.
QUEUE_ORDER = ("-priority", "created_at", "id")


def job_list_for_user(*, user: AbstractBaseUser, status: str | None = None) -> QuerySet[Job]:
    """The jobs a user may see: their own; staff see everyone's."""
    jobs = Job.objects.select_related("owner")
    if not user.is_staff:
        jobs = jobs.filter(owner=user)
    if status:
        jobs = jobs.filter(status=status)
    return jobs


def job_get_for_user(*, user: AbstractBaseUser, job_id: int) -> Job:
    """One job the user may see, or Http404 (never 403: others' jobs do not exist for them)."""
    return get_object_or_404(job_list_for_user(user=user).select_related("calibration_file"), pk=job_id)


def job_list_owned_by(*, user: AbstractBaseUser) -> QuerySet[Job]:
    """The user's own jobs, staff too: what one pushes with one's own hub token."""
    return Job.objects.filter(owner=user)


def job_get_owned(*, user: AbstractBaseUser, job_id: int) -> Job:
    """One of the user's own jobs, or Http404."""
    return get_object_or_404(job_list_owned_by(user=user), pk=job_id)


def queued_jobs(*, queue: str | None = None) -> QuerySet[Job]:
    """Waiting jobs in the order workers will take them (QUEUE_ORDER)."""
    jobs = Job.objects.filter(status=Job.Status.QUEUED).select_related("owner")
    if queue:
        jobs = jobs.filter(queue=queue)
    return jobs.order_by(*QUEUE_ORDER)


def queue_position(*, job: Job) -> int | None:
    """1 for the next job its queue hands out; None when the job is not waiting (one COUNT on the index).

    Written as SQL from QUEUE_ORDER: every submission answers with its position, and the ORM's compiling of
    this three-way OR costs more than the count itself.
    """
    if job.status != Job.Status.QUEUED:
        return None
    ahead, params = _ahead_of(job)
    column = {name: connection.ops.quote_name(Job._meta.get_field(name).column) for name in ("status", "queue")}
    sql = (
        f"SELECT COUNT(*) FROM {connection.ops.quote_name(Job._meta.db_table)} "
        f"WHERE {column['status']} = %s AND {column['queue']} = %s AND ({ahead})"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [Job.Status.QUEUED, job.queue, *params])
        return cursor.fetchone()[0] + 1


def _ahead_of(job: Job) -> tuple[str, list]:
    """SQL for the waiting jobs before `job` in QUEUE_ORDER (ahead on the first field that differs), and its
    parameters, each as its field gives it to the database."""
    branches, same, same_params, params = [], [], [], []
    for key in QUEUE_ORDER:
        field = Job._meta.get_field(key.lstrip("-"))
        column = connection.ops.quote_name(field.column)
        value = field.get_db_prep_value(getattr(job, field.attname), connection)
        branches.append(" AND ".join([*same, f"{column} {'>' if key.startswith('-') else '<'} %s"]))
        params += [*same_params, value]
        same.append(f"{column} = %s")
        same_params.append(value)
    return " OR ".join(f"({branch})" for branch in branches), params


def queue_positions() -> dict[int, int]:
    """The position of every waiting job in its queue, in one query (for list pages: no query per row)."""
    positions: dict[int, int] = {}
    seen_per_queue: dict[str, int] = {}
    for job_id, queue in queued_jobs().values_list("id", "queue"):
        seen_per_queue[queue] = seen_per_queue.get(queue, 0) + 1
        positions[job_id] = seen_per_queue[queue]
    return positions


# How many finished jobs of a queue its wait estimate reads (the newest): enough to smooth one odd job out,
# few enough to follow a change of what the queue runs.
RECENT_DURATIONS = 20


@dataclass(frozen=True)
class QueueWait:
    """Where a waiting job stands: its place, the jobs before it (the first few) and about how long until a
    worker takes it. estimate_s is None when its queue has no finished job to measure by."""

    position: int
    ahead: list[Job]
    estimate_s: float | None

    @property
    def ahead_count(self) -> int:
        return self.position - 1

    @property
    def ahead_not_listed(self) -> int:
        return self.ahead_count - len(self.ahead)


def queue_wait(*, job: Job, ahead_limit: int = 10) -> QueueWait | None:
    """The queued job's place and wait, or None when it is not waiting.

    The wait: the median run of the queue's recent finished jobs for each job ahead, plus what the running
    ones on the queue have left of that median, shared among the live workers that consume the queue."""
    position = queue_position(job=job)
    if position is None:
        return None
    ahead = list(queued_jobs(queue=job.queue)[: min(position - 1, ahead_limit)])
    median = _median_run_s(job.queue)
    if median is None:
        return QueueWait(position=position, ahead=ahead, estimate_s=None)
    from django.utils import timezone

    now = timezone.now()
    running = Job.objects.filter(status=Job.Status.RUNNING, queue=job.queue).values_list("started_at", flat=True)
    left = sum(max(median - (now - started).total_seconds(), 0.0) for started in running if started)
    workers = sum(1 for node in WorkerNode.objects.all() if job.queue in node.queues and node.is_online(now))
    return QueueWait(position=position, ahead=ahead, estimate_s=((position - 1) * median + left) / max(workers, 1))


def _median_run_s(queue: str) -> float | None:
    runs = [
        (finished - started).total_seconds()
        for started, finished in Job.objects.filter(queue=queue, status=Job.Status.SUCCEEDED)
        .exclude(started_at=None)
        .exclude(finished_at=None)
        .order_by("-finished_at")
        .values_list("started_at", "finished_at")[:RECENT_DURATIONS]
    ]
    return statistics.median(runs) if runs else None


def default_device_class() -> str:
    """The worker class the form offers first: the configured one, unless no live worker serves it and live
    workers serve another (a CPU-only server should not propose GPU, where a job would wait for ever)."""
    from django.conf import settings

    configured = settings.COMPRESSOR_DEFAULT_DEVICE_CLASS
    served = {
        c for node in WorkerNode.objects.all() if node.is_online() for c in Job.DeviceClass.values if c in node.queues
    }
    if not served or configured in served:
        return configured
    return next(c for c in Job.DeviceClass.values if c in served)


def job_log_after(*, job: Job, after: int = 0, limit: int = 500) -> list[JobLogLine]:
    """Log lines newer than the cursor (a line id); pass the last id back to get only what is new."""
    return list(JobLogLine.objects.filter(job=job, id__gt=after).order_by("id")[:limit])


def calibration_datasets_for_user(*, user: AbstractBaseUser) -> QuerySet[CalibrationDataset]:
    datasets = CalibrationDataset.objects.select_related("owner")
    return datasets if user.is_staff else datasets.filter(owner=user)


# --- the broker and the workers (the admin's queue page) ---------------------------------------------------


@dataclass(frozen=True)
class Announced:
    """What a worker announced to the registry (jobs.nodes), as the queue page shows it."""

    machine: str
    online: bool
    gpus: str
    host_ram: str
    disk: str
    capped: list[str]
    started_at: Any
    heartbeat_at: Any

    @classmethod
    def of(cls, node: WorkerNode) -> Announced:
        gpus = ", ".join(
            f"{g['name'] or 'GPU ' + str(g['index'])} ({size_text(g['memory_bytes'])} free)" for g in node.gpus
        )
        return cls(
            machine=node.node,
            online=node.is_online(),
            gpus=f"{len(node.gpus)}: {gpus}" if node.gpus else "none",
            host_ram=size_text(node.host_ram_bytes),
            disk=size_text(node.disk_free_bytes),
            capped=list(node.capped),
            started_at=node.started_at,
            heartbeat_at=node.heartbeat_at,
        )


@dataclass
class WorkerInfo:
    name: str
    queues: list[str] = field(default_factory=list)
    running: list[dict[str, Any]] = field(default_factory=list)  # {"task_id", "name", "job"}
    announced: Announced | None = None  # None: a worker that never registered (started before the registry)


@dataclass
class QueueCount:
    """One queue as the database and the broker see it; the two can differ, and `note` says why."""

    name: str
    waiting_jobs: int
    messages: int | None  # None: the broker did not answer

    @property
    def note(self) -> str:
        if self.messages is None or self.messages == self.waiting_jobs:
            return ""
        if self.messages > self.waiting_jobs:
            extra = self.messages - self.waiting_jobs
            return (
                f"{extra} message(s) belong to no waiting job: their jobs were cancelled, or already taken "
                "and re-queued. A worker takes each and drops it without running anything."
            )
        missing = self.waiting_jobs - self.messages
        return (
            f"{missing} waiting job(s) have no message in the broker right now: a worker has already "
            "reserved it (it starts when the worker is free), or the message is being re-published."
        )


@dataclass
class QueueOverview:
    queues: list[QueueCount]
    waiting: list[tuple[int, Job]]  # (position in its queue, job), in the order workers take them
    running: list[Job]
    error: str = ""


def active_task_ids(*, timeout: float = 2.0) -> set[str]:
    """Task ids the workers are executing right now (asks every worker; empty when none answers)."""
    from compressor_app.celery import app

    active = app.control.inspect(timeout=timeout).active() or {}
    return {task["id"] for tasks in active.values() for task in tasks}


def broker_queue_lengths(names: tuple[str, ...] = QUEUE_NAMES) -> dict[str, int]:
    """Messages per queue in the broker (all priority levels); raises when the broker does not answer."""
    from compressor_app.celery import app

    with app.pool.acquire(block=True, timeout=2) as conn:  # a pooled connection: a new one costs ~50 ms
        channel = conn.default_channel
        return {name: channel.queue_declare(queue=name).message_count for name in names}


def queue_overview(*, waiting_limit: int = 200) -> QueueOverview:
    """The queue page: waiting and running jobs from the database (the truth about jobs), with the broker's
    message count per queue beside the database's. A fixed number of queries, however long the queue;
    it never waits for workers to answer (worker_overview does, on its own request)."""
    positions = queue_positions()
    waiting = [(positions[job.pk], job) for job in queued_jobs()[:waiting_limit] if job.pk in positions]
    counts = dict(
        Job.objects.filter(status=Job.Status.QUEUED)
        .order_by()
        .values("queue")
        .annotate(n=Count("id"))
        .values_list("queue", "n")
    )
    running = list(Job.objects.filter(status=Job.Status.RUNNING).select_related("owner").order_by("started_at"))
    error = ""
    # The shared queues, then each registered worker's own queue and any other queue a job waits in.
    own = {node.own_queue for node in WorkerNode.objects.all()}
    names = list(QUEUE_NAMES) + sorted((set(counts) | own) - set(QUEUE_NAMES))
    try:
        lengths: dict[str, int | None] = {**broker_queue_lengths(tuple(names))}
    except Exception as exc:  # noqa: BLE001 - the page still shows the database's view
        logger.warning("Broker queue lengths unavailable: %s", exc)
        lengths, error = {}, f"The broker did not answer: {exc}"
    queues = [QueueCount(name=n, waiting_jobs=counts.get(n, 0), messages=lengths.get(n)) for n in names]
    return QueueOverview(queues=queues, waiting=waiting, running=running, error=error)


def worker_overview(*, ask: bool = True, timeout: float = 1.0) -> tuple[list[WorkerInfo], str]:
    """Every registered worker (online or not, with what it announced) and, when `ask`, every worker that
    answers, with what each runs. Asking waits `timeout` for the answers, so the queue page answers from the
    registry (ask=False: what the workers last reported, and the running jobs the database records) and asks
    only on the operator's button. Returns (workers, error text)."""
    registry = {node.hostname: node for node in WorkerNode.objects.all()}
    active: dict[str, list[dict[str, Any]]] = {}
    queues: dict[str, list[str]] = {}
    error = ""
    if ask:
        from compressor_app.celery import app

        try:
            inspect = app.control.inspect(timeout=timeout)
            active = inspect.active() or {}
            queues = {name: [q["name"] for q in found] for name, found in (inspect.active_queues() or {}).items()}
        except Exception as exc:  # noqa: BLE001 - shown on the page instead of an error page
            logger.warning("Worker overview unavailable: %s", exc)
            active, queues, error = {}, {}, f"The workers did not answer: {exc}"
    task_ids = {task["id"] for tasks in active.values() for task in tasks}
    jobs_by_task = {j.celery_task_id: j for j in Job.objects.filter(celery_task_id__in=task_ids)}
    # A worker that does not answer (offline, or busy past the timeout): its running job from the database.
    running_by_worker: dict[str, list[Job]] = {}
    for job in Job.objects.filter(status=Job.Status.RUNNING, worker__in=list(registry)):
        running_by_worker.setdefault(job.worker, []).append(job)
    workers: list[WorkerInfo] = []
    for name in sorted(set(active) | set(queues) | set(registry)):
        node = registry.get(name)
        info = WorkerInfo(
            name=name,
            queues=sorted(queues.get(name) or (node.queues if node else [])),
            announced=Announced.of(node) if node else None,
        )
        for task in active.get(name, []):
            info.running.append({"task_id": task["id"], "name": task["name"], "job": jobs_by_task.get(task["id"])})
        if name not in active:
            info.running = [
                {"task_id": j.celery_task_id, "name": COMPRESS, "job": j} for j in running_by_worker.get(name, [])
            ]
        workers.append(info)
    return workers, error


# --- used by frontend (the dashboard pages); appended by the frontend work, read-only queries -------------


def job_list_filtered(
    *, user: AbstractBaseUser, status: str | None = None, preset: str | None = None, model: str | None = None
) -> QuerySet[Job]:
    """The jobs list page: job_list_for_user narrowed by preset and model as well."""
    jobs = job_list_for_user(user=user, status=status)
    if preset:
        jobs = jobs.filter(preset=preset)
    if model:
        jobs = jobs.filter(model_source=model)
    return jobs


def job_stage_started(*, job: Job) -> dict[str, Any]:
    """When each stage began: the time of the job's first log line in it (stage name -> datetime)."""
    from django.db.models import Min

    rows = (
        JobLogLine.objects.filter(job=job)
        .exclude(stage="")
        .order_by()
        .values("stage")
        .annotate(first=Min("created_at"))
    )
    return {row["stage"]: row["first"] for row in rows}


def job_log_tail(*, job: Job, lines: int = 40) -> list[JobLogLine]:
    """The newest log lines of a job, oldest first."""
    return list(reversed(JobLogLine.objects.filter(job=job).order_by("-id")[:lines]))


def job_models_for_user(*, user: AbstractBaseUser) -> list[str]:
    """Models the user has succeeded jobs for (the compare page's choice)."""
    jobs = job_list_for_user(user=user, status=Job.Status.SUCCEEDED)
    return sorted(set(jobs.values_list("model_source", flat=True)))


def calibration_dataset_preview(*, dataset: CalibrationDataset, rows: int = 5, max_chars: int = 300) -> list[str]:
    """The first rows of an uploaded JSONL file, each cut to max_chars (the form's preview)."""
    preview: list[str] = []
    try:
        with dataset.file.open("rb") as handle:
            for raw in handle:
                line = raw.decode("utf-8", errors="replace").strip()
                if line:
                    preview.append(line if len(line) <= max_chars else line[:max_chars] + "…")
                if len(preview) >= rows:
                    break
    except OSError:
        return []
    return preview


def api_token_of(*, user: AbstractBaseUser):
    """The user's DRF API token row (its key and when it was made), or None."""
    from rest_framework.authtoken.models import Token

    return Token.objects.filter(user=user).first()
