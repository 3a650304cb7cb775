"""A size limit applied while an upload streams in: an oversized file stops before it reaches the disk.

Installed first in settings.FILE_UPLOAD_HANDLERS, so it covers the API, the job form and the admin alike.
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.files.uploadhandler import FileUploadHandler

# Room for the multipart boundaries and the other form fields around the file.
_FORM_OVERHEAD_BYTES = 64 * 1024


class UploadTooLarge(RequestDataTooBig):
    """An uploaded file over COMPRESSOR_MAX_UPLOAD_BYTES (Django answers 400, the API a JSON 400)."""

    def __init__(self) -> None:
        super().__init__(f"The file is larger than the limit of {settings.COMPRESSOR_MAX_UPLOAD_BYTES // 2**20} MiB.")


class UploadSizeLimit(FileUploadHandler):
    """Counts the bytes of each uploaded file and stops the upload past COMPRESSOR_MAX_UPLOAD_BYTES.

    A Content-Length over the limit is refused before any of the body is read; a body that turns out longer
    is cut off at the limit, and Django's later handlers (which write the temporary file) never see more.
    """

    def __init__(self, request=None) -> None:
        super().__init__(request)
        self.limit_bytes = settings.COMPRESSOR_MAX_UPLOAD_BYTES
        self._received = 0

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        if content_length and content_length > self.limit_bytes + _FORM_OVERHEAD_BYTES:
            raise UploadTooLarge()

    def new_file(self, *args, **kwargs) -> None:
        super().new_file(*args, **kwargs)
        self._received = 0

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        self._received += len(raw_data)
        if self._received > self.limit_bytes:
            raise UploadTooLarge()
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None
