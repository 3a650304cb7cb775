"""Every refused API request answered once, here: the domain's errors mapped to HTTP for every view, and the
requests Django refuses before a view runs answered in DRF's JSON shape too."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from rest_framework import status
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from engine.errors import EngineError
from jobs import downloads
from jobs.inputs import request_field
from jobs.ratelimit import RateLimited
from jobs.services.errors import JobStateError
from jobs.uploads import UploadTooLarge


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"
    default_detail = "The job is not in a state that allows this."


class TooManyRequests(APIException):
    """429 with the limit's own sentence as it is (DRF's Throttled would add a second "expected available in
    N seconds"); DRF's handler sends `wait` as Retry-After."""

    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_code = "throttled"

    def __init__(self, detail: str, *, wait: int) -> None:
        super().__init__(detail)
        self.wait = wait


def api_error(exc: Exception) -> APIException | None:
    """The HTTP answer to a domain error, or None when exc is not one.

    EngineError (PreflightError, PushRefused): 400 naming the request field; JobStateError and a checkpoint that
    cannot be downloaded: 409; RateLimited (the creation rate, a quota): 429 with Retry-After.
    """
    if isinstance(exc, EngineError):
        return ValidationError({request_field(exc.field) or "non_field_errors": [exc.message]})
    if isinstance(exc, JobStateError):
        return Conflict(exc.message)
    if isinstance(exc, downloads.NotDownloadable):
        return Conflict(str(exc))
    if isinstance(exc, RateLimited):
        return TooManyRequests(exc.message, wait=exc.retry_after)
    return None


def exception_handler(exc, context):
    """DRF's handler for the domain's errors (api_error), and a JSON 400 for a body over
    DATA_UPLOAD_MAX_MEMORY_SIZE and other malformed input.

    Django raises those while the request body is read (as request.data is parsed); left alone they
    become Django's HTML 400 page.
    """
    if isinstance(exc, UploadTooLarge):  # stopped while it streamed in (jobs.uploads)
        return Response({"file": [str(exc)]}, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, RequestDataTooBig):
        limit_mb = settings.DATA_UPLOAD_MAX_MEMORY_SIZE // 2**20
        detail = f"The request body is larger than {limit_mb} MB; upload files as multipart form data."
        return Response({"detail": detail}, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, SuspiciousOperation):
        return Response({"detail": f"The request was refused: {exc}"}, status=status.HTTP_400_BAD_REQUEST)
    return drf_exception_handler(api_error(exc) or exc, context)
