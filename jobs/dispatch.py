"""The messages the services send to the workers: each task by the name it is registered under.

The flow is one way: a request calls the services, the services send a message, a worker's task calls the
services. The tasks (jobs.tasks) import the services, so the services send by name through the Celery app
rather than through the task objects: importing jobs.tasks from jobs.services would close a circle.
"""

from __future__ import annotations

from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from compressor_app.celery import app
from jobs.task_names import COMPRESS, PUSH_TO_HUB, STOP_CANCELLED, Queue

# What the services send, by the names jobs.task_names declares (jobs.tasks registers its tasks under them).
__all__ = ("BROKER_ERRORS", "COMPRESS", "PUSH_TO_HUB", "STOP_CANCELLED", "Queue", "revoke", "send")

# What a send or a revoke raises when Redis is unreachable or restarting.
BROKER_ERRORS = (OperationalError, RedisError, OSError)


def send(task_name: str, object_id: int, *, task_id: str | None = None, **options) -> None:
    """Send one task's message for the row object_id (tasks are passed ids, never objects).

    options are Celery's: queue, priority, countdown. Raises a broker error when Redis does not answer.
    """
    app.send_task(task_name, args=(object_id,), task_id=task_id, **options)


def revoke(task_id: str) -> None:
    """Tell every worker to drop the message task_id when it receives it. Raises a broker error likewise."""
    app.control.revoke(task_id)
