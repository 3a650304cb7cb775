"""Jobs whose run or message was lost, put back on track.

A run whose worker vanished (killed, out of memory, a machine gone) is re-queued once, then failed: the
worker's main process reports a child's death at once (job_worker_lost), the reaper finds a worker that died
whole by its silent heartbeat (job_reap_stale). A queued job whose message is gone from Redis is sent again
(job_sweep_stranded), and one waiting in the own queue of a worker that went offline is routed again
(job_reroute_from_offline_nodes). Each change is guarded by what was seen (task id, heartbeat), so a run that
wakes up meanwhile keeps its job.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from jobs import nodes
from jobs.models import Job, WorkerNode
from jobs.services import broker, job_log, lifecycle, storage
from jobs.services.transitions import Action, allowed, transition

Status = Job.Status

MAX_REQUEUES = 1  # a job whose worker vanishes is tried this many more times, then failed


def job_reap_stale(*, now=None) -> list[tuple[int, str]]:
    """End running jobs whose worker stopped sending heartbeats: re-queue each once, then fail it.

    A job that ran past the hard time limit was killed by it: it fails with "time limit" and is never
    re-queued (another run would only hit the same limit). The partial output a lost run leaves is
    removed by the job's next run or, once the job has ended, by retention.job_remove_stale_partials. Every
    change is guarded by the heartbeat and the task id the reaper saw, so a run that wakes up and beats
    meanwhile keeps its job. Returns (job id, "requeued" | "failed") for each job it acted on.
    """
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.COMPRESSOR_HEARTBEAT_TIMEOUT_S)
    stale = Job.objects.filter(status=Status.RUNNING).filter(
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, started_at__lt=cutoff)
    )
    acted: list[tuple[int, str]] = []
    for job in stale:
        seen = lifecycle.with_task(job.pk, job.celery_task_id).filter(heartbeat_at=job.heartbeat_at)
        last = job.heartbeat_at or job.started_at
        silence = (
            f"the worker {job.worker or '(unknown)'} stopped answering (last heartbeat {last:%Y-%m-%d %H:%M:%S} UTC)"
        )
        ran_s = (now - job.started_at).total_seconds() if job.started_at else 0.0
        if ran_s >= settings.COMPRESSOR_JOB_HARD_LIMIT_S:
            error = lifecycle.time_limit_error(settings.COMPRESSOR_JOB_HARD_LIMIT_S)
            if lifecycle.fail(seen, job_id=job.pk, error=error):
                acted.append((job.pk, "failed"))
        elif action := _end_lost_run(job, seen, silence):
            acted.append((job.pk, action))
    return acted


def job_worker_lost(*, job_id: int, task_id: str, reason: str) -> str | None:
    """The process running this run died (killed, out of memory): re-queue the job once, else fail it.

    The worker's main process calls this the moment its child dies; the reaper does the same, after the
    heartbeat timeout, for a worker that died whole. Returns "requeued", "failed" or None (nothing to do).
    """
    run = lifecycle.with_task(job_id, task_id)
    job = allowed(run, Action.REQUEUE).first()
    if job is None:
        return None
    return _end_lost_run(job, run, f"the worker {job.worker or '(unknown)'} {reason}")


def _end_lost_run(job: Job, seen: QuerySet[Job], what_happened: str) -> str | None:
    if job.requeue_count < MAX_REQUEUES:
        return "requeued" if _requeue_lost(job, seen, what_happened) else None
    attempts = job.requeue_count + 1
    error = f"Worker lost: {what_happened}. This was attempt {attempts} of {attempts}, so it is not re-queued."
    return "failed" if lifecycle.fail(seen, job_id=job.pk, error=error) else None


def _requeue_lost(job: Job, seen: QuerySet[Job], what_happened: str) -> bool:
    new_task_id = broker.new_task_id()
    # Its node may be gone. Where it is not (the run died, its worker did not), the layers the run compressed
    # are on that node's disk: the worker that noticed is on it, and sends the job back there.
    holder = job.worker if job.worker and storage.job_resume_folder(job).is_dir() else None
    route = nodes.job_reroute(job, back_to=holder)
    with transaction.atomic():
        done = transition(
            seen,
            Action.REQUEUE,
            queue=route.queue,
            requeue_count=job.requeue_count + 1,
            celery_task_id=new_task_id,
            stage=Job.Stage.WAITING,
            message="Re-queued after its worker vanished",
            started_at=None,
            worker="",
            step=None,
            total=None,
            percent=None,
        )
        if done:
            job.celery_task_id, job.queue = new_task_id, route.queue
            job_log.job_log_append(
                job_id=job.pk,
                lines=[(Job.Stage.WAITING, f"Re-queued for attempt {job.requeue_count + 2}: {what_happened}.")],
            )
            if route.why:
                job_log.job_log_append(job_id=job.pk, lines=[(Job.Stage.WAITING, route.why)])
            transaction.on_commit(lambda: broker.enqueue(job))
    return bool(done)


def job_sweep_stranded(*, older_than_s: float | None = None) -> list[int]:
    """Send queued jobs again whose broker message is gone; return their ids.

    A message is lost when publishing failed after the commit (Redis down) or when Redis lost its data
    (flushed, restarted without persistence). The database is the truth: a queued job whose task id is in
    none of its queue's lists and not among the delivered-but-unacknowledged messages gets a new task id
    and a new message. A job runs at most once even if the old message turns up after all: the claim
    (job_start) needs the job's current task id. Jobs younger than older_than_s (default
    COMPRESSOR_SWEEP_GRACE_S) are left alone, their message may still be on its way.
    """
    grace = settings.COMPRESSOR_SWEEP_GRACE_S if older_than_s is None else older_than_s
    cutoff = timezone.now() - timedelta(seconds=grace)
    waiting = list(Job.objects.filter(status=Status.QUEUED, created_at__lte=cutoff))
    if not waiting:
        return []
    in_broker = broker.broker_task_ids(queues={job.queue for job in waiting})
    sent: list[int] = []
    for job in waiting:
        if job.celery_task_id in in_broker:
            continue
        new_task_id = broker.new_task_id()
        route = nodes.job_reroute(job)  # the node whose queue it waited in may be gone
        with transaction.atomic():
            done = transition(
                lifecycle.with_task(job.pk, job.celery_task_id),
                Action.RESEND,
                celery_task_id=new_task_id,
                queue=route.queue,
                message="Waiting in the queue",
            )
            if done:
                job.celery_task_id, job.queue = new_task_id, route.queue
                job_log.job_log_append(
                    job_id=job.pk,
                    lines=[(Job.Stage.WAITING, "Its queue message was lost (queue unreachable or reset); sent again.")],
                )
                transaction.on_commit(lambda job=job: broker.enqueue(job))
                sent.append(job.pk)
    return sent


def job_reroute_from_offline_nodes() -> list[int]:
    """Queued jobs waiting in the own queue of a worker that is offline now: routed again (to another worker
    that can hold them, or the shared queue), each with a new message; the old one finds a different task id
    if that worker comes back. A job only that worker can hold keeps waiting for it. Returns the jobs moved."""
    offline = [nodes.own_queue(node.hostname) for node in WorkerNode.objects.all() if not node.is_online()]
    moved: list[int] = []
    for job in Job.objects.filter(status=Status.QUEUED, queue__in=offline):
        route = nodes.job_reroute(job)
        if route.queue == job.queue:
            continue
        old_task_id, new_task_id = job.celery_task_id, broker.new_task_id()
        with transaction.atomic():
            done = transition(
                lifecycle.with_task(job.pk, old_task_id), Action.RESEND, queue=route.queue, celery_task_id=new_task_id
            )
            if done:
                job_log.job_log_append(
                    job_id=job.pk,
                    lines=[(Job.Stage.WAITING, f"The worker of '{job.queue}' is offline; sent to '{route.queue}'.")],
                )
                job.queue, job.celery_task_id = route.queue, new_task_id
                transaction.on_commit(lambda job=job, old=old_task_id: broker.requeue(job, old))
                moved.append(job.pk)
    return moved
