"""A job's message on the broker (Redis): send it, send it again, read which messages the broker holds.

A job that gets a new message gets a new task id: the old message, should it still arrive, finds a different
task id on the job and claims nothing (lifecycle.job_start).
"""

from __future__ import annotations

import json
import logging
import uuid

from django.db import transaction

from jobs import dispatch
from jobs.dispatch import BROKER_ERRORS
from jobs.models import Job
from jobs.services import job_log
from jobs.services.transitions import Action, transition

logger = logging.getLogger(__name__)

QUEUE_UNREACHABLE = "The queue is unreachable right now; the job is kept and will be sent when the queue is back."


def new_task_id() -> str:
    return str(uuid.uuid4())


def broker_priority(priority: int) -> int:
    """Job priority (9 runs first) -> Redis broker priority (0 is polled first)."""
    return 9 - max(0, min(9, int(priority)))


def enqueue(job: Job) -> bool:
    """Send the job's message; False when the broker does not answer.

    The job stays queued in the database either way (the database is the truth): job_sweep_stranded sends
    it again once the broker answers, so a Redis outage never turns a request into a 500 or loses a job.
    """
    try:
        dispatch.send(
            dispatch.COMPRESS,
            job.pk,
            task_id=job.celery_task_id,
            queue=job.queue,
            priority=broker_priority(job.priority),
        )
    except BROKER_ERRORS as exc:
        logger.warning("Could not send job %s to the queue: %s", job.pk, exc)
        job.message = QUEUE_UNREACHABLE
        with transaction.atomic():
            if transition(Job.objects.filter(pk=job.pk), Action.RESEND, message=QUEUE_UNREACHABLE):
                job_log.job_log_append(job_id=job.pk, lines=[(Job.Stage.WAITING, QUEUE_UNREACHABLE)])
        return False
    return True


def requeue(job: Job, old_task_id: str) -> None:
    """Send the job's new message (its new task id, queue or priority) and revoke the old one."""
    try:
        dispatch.revoke(old_task_id)
    except BROKER_ERRORS as exc:
        logger.warning("Could not revoke the old message of job %s: %s", job.pk, exc)
    enqueue(job)


def broker_task_ids(*, queues: set[str]) -> set[str]:
    """Task ids of the messages Redis holds for these queues: waiting (every priority level) or delivered
    to a worker and not yet acknowledged. Raises a broker error when Redis does not answer."""
    from compressor_app.celery import app

    with app.connection_for_read() as conn:
        channel = conn.default_channel
        prefix = getattr(channel, "global_keyprefix", "")  # LRANGE and HVALS are not prefixed by kombu itself
        client = channel.client
        raw: list[bytes] = []
        for queue in queues:
            for level in sorted({channel._q_for_pri(queue, step) for step in channel.priority_steps}):
                raw += client.lrange(prefix + level, 0, -1)
        unacked = [json.loads(value)[0] for value in client.hvals(prefix + channel.unacked_key)]
    messages = [json.loads(item) for item in raw] + unacked
    return {message.get("headers", {}).get("id") for message in messages if isinstance(message, dict)} - {None}
