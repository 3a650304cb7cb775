"""A job's whole log as one text/plain download (for the job page and the API alike), times in UTC with the
zone. Its lines were stored redacted (jobs.services, by jobs.redaction with the writer's own folders)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from django.http import StreamingHttpResponse

from jobs.models import Job, JobLogLine


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _log_text(job: Job) -> Iterator[str]:
    yield f"# Log of job {job.pk} ({job.recipe_label} on {job.model_source}); times in UTC\n"
    for line in JobLogLine.objects.filter(job=job).order_by("id").iterator(chunk_size=2000):
        stage = f" [{line.stage}]" if line.stage else ""
        yield f"{_utc(line.created_at)}{stage} {line.text}\n"


def log_response(job: Job) -> StreamingHttpResponse:
    """The whole log as a text/plain attachment, streamed (a long job's log is never held in memory)."""
    response = StreamingHttpResponse(_log_text(job), content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="job-{job.pk}-log.txt"'
    response["X-Content-Type-Options"] = "nosniff"
    return response
