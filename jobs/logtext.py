"""A job's log as its owner sees it: without the server's absolute paths, times in UTC with the zone, and the
whole log as one text/plain download (for the job page and the API alike)."""

from __future__ import annotations

import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from django.conf import settings
from django.http import StreamingHttpResponse

from jobs.models import Job, JobLogLine

# An absolute path not part of a URL or of a relative path: "/srv/x/y.py" but not "https://a/b" or "a/b".
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[\w.@+-]+/)+(?=[\w.@+-])")


def _known_roots() -> list[str]:
    """Server folders whose prefix is dropped (longest first): the data folders, the packages, the code."""
    roots = {settings.MEDIA_ROOT, getattr(settings, "MODEL_STORE_DIR", None), getattr(settings, "DATA_DIR", None)}
    roots |= {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], settings.BASE_DIR, sys.prefix}
    paths = {str(root).rstrip("/") for root in roots if root}
    return sorted((p + "/" for p in paths if p), key=len, reverse=True)


def redact_paths(text: str) -> str:
    """Drop server path prefixes: ".../site-packages/transformers/x.py" reads "transformers/x.py", the
    checkpoint folder reads "jobs/7/checkpoint", any other absolute folder becomes ".../"."""
    for root in _known_roots():
        text = text.replace(root, "")
    return _ABSOLUTE_PATH.sub(".../", text)


@dataclass
class LogLine:
    created_at: datetime
    stage: str
    text: str


def public_lines(lines: Iterable[JobLogLine]) -> list[LogLine]:
    return [LogLine(line.created_at, line.stage, redact_paths(line.text)) for line in lines]


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _log_text(job: Job) -> Iterator[str]:
    yield f"# Log of job {job.pk} ({job.recipe_label} on {job.model_source}); times in UTC\n"
    for line in JobLogLine.objects.filter(job=job).order_by("id").iterator(chunk_size=2000):
        stage = f" [{line.stage}]" if line.stage else ""
        yield f"{_utc(line.created_at)}{stage} {redact_paths(line.text)}\n"


def log_response(job: Job) -> StreamingHttpResponse:
    """The whole log as a text/plain attachment, streamed (a long job's log is never held in memory)."""
    response = StreamingHttpResponse(_log_text(job), content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="job-{job.pk}-log.txt"'
    response["X-Content-Type-Options"] = "nosniff"
    return response
