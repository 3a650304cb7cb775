"""A job's log: (stage, text) lines, redacted, of which the newest COMPRESSOR_JOB_LOG_MAX_LINES are kept."""

from __future__ import annotations

from django.conf import settings

from jobs.models import JobLogLine
from jobs.redaction import redact


def job_log_append(*, job_id: int, lines: list[tuple[str, str]]) -> None:
    """Append (stage, text) lines, without paths or tokens, and keep only the newest COMPRESSOR_JOB_LOG_MAX_LINES.

    The services log each change they make with it; a push to a hub logs through it after the run."""
    JobLogLine.objects.bulk_create(log_rows(job_id, lines))
    keep = settings.COMPRESSOR_JOB_LOG_MAX_LINES
    oldest_kept = JobLogLine.objects.filter(job_id=job_id).order_by("-id").values_list("id", flat=True)[keep - 1 : keep]
    oldest = list(oldest_kept)
    if oldest:
        JobLogLine.objects.filter(job_id=job_id, id__lt=oldest[0]).delete()


def log_rows(job_id: int, lines: list[tuple[str, str]]) -> list[JobLogLine]:
    """The log rows of these lines, redacted and cut to the column's 4000 characters (not yet saved)."""
    return [JobLogLine(job_id=job_id, stage=stage or "", text=redact(text)[:4000]) for stage, text in lines]
