"""A job's states and the actions that move it between them, declared once.

Each action acts only on a job in one of its source statuses, and leaves it in its target status (None: the
status stays). The services change a job through transition(), one conditional UPDATE whose row count says
whether the action happened: a late message from a killed or cancelled task, or a second click, finds the job
in another status and changes nothing.

    submit        (new)               -> queued     job_submit, and the new job of a retry or a clone
    start         queued              -> running    job_start: a worker claims it
    progress      running             -> running    job_record_progress: stage, percent, heartbeat
    finish        running             -> succeeded  job_finish
    fail          running             -> failed     job_fail; a lost run not re-queued; the time limit
    requeue       running             -> queued     a lost run's job, once (the reaper, job_worker_lost)
    resend        queued              -> queued     a new message: priority, lost message, offline node;
                                                    or the note that the queue was unreachable
    cancel        queued, running     -> cancelled  job_cancel
    retry         failed, cancelled   (stays)       job_retry submits a new job linked to it
    delete        succeeded, failed,  (row goes)    job_delete, artifacts_expire
                  cancelled
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from django.db.models import QuerySet

from jobs.models import Job

Status = Job.Status


class Action(StrEnum):
    SUBMIT = "submit"
    START = "start"
    PROGRESS = "progress"
    FINISH = "finish"
    FAIL = "fail"
    REQUEUE = "requeue"
    RESEND = "resend"
    CANCEL = "cancel"
    RETRY = "retry"
    DELETE = "delete"


@dataclass(frozen=True)
class Move:
    sources: frozenset[str]  # the statuses the action acts on (none: it creates the job)
    target: str | None  # the status it leaves the job in; None: the status stays (or the row goes)


TRANSITIONS: dict[Action, Move] = {
    Action.SUBMIT: Move(frozenset(), Status.QUEUED),
    Action.START: Move(frozenset({Status.QUEUED}), Status.RUNNING),
    Action.PROGRESS: Move(frozenset({Status.RUNNING}), None),
    Action.FINISH: Move(frozenset({Status.RUNNING}), Status.SUCCEEDED),
    Action.FAIL: Move(frozenset({Status.RUNNING}), Status.FAILED),
    Action.REQUEUE: Move(frozenset({Status.RUNNING}), Status.QUEUED),
    Action.RESEND: Move(frozenset({Status.QUEUED}), None),
    Action.CANCEL: Move(Job.ACTIVE, Status.CANCELLED),
    Action.RETRY: Move(frozenset({Status.FAILED, Status.CANCELLED}), None),
    Action.DELETE: Move(Job.TERMINAL, None),
}


def may(action: Action, status: str) -> bool:
    """Whether the action acts on a job in this status."""
    return status in TRANSITIONS[action].sources


def allowed(rows: QuerySet[Job], action: Action) -> QuerySet[Job]:
    """Those of the rows the action acts on (their status is one of its sources)."""
    return rows.filter(status__in=TRANSITIONS[action].sources)


def transition(rows: QuerySet[Job], action: Action, **fields) -> int:
    """Apply the action to those of the rows in its source statuses: one UPDATE that sets its target status
    (if it has one) and fields. Returns how many rows it changed (0: the action did not happen)."""
    target = TRANSITIONS[action].target
    if target is not None:
        fields["status"] = target
    return allowed(rows, action).update(**fields)
