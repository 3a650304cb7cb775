"""The API answers every refused request in DRF's JSON shape, also those Django refuses before a view runs."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from jobs.uploads import UploadTooLarge


def exception_handler(exc, context):
    """DRF's handler, plus a JSON 400 for a body over DATA_UPLOAD_MAX_MEMORY_SIZE and other malformed input.

    Django raises these while the request body is read (as request.data is parsed); left alone they
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
    return drf_exception_handler(exc, context)
