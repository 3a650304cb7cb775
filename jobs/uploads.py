"""A size limit applied while an upload streams in: an oversized file stops before it reaches the disk."""

from __future__ import annotations

from django.core.files.uploadhandler import FileUploadHandler, StopUpload
from django.http import QueryDict
from django.utils.datastructures import MultiValueDict

# Room for the multipart boundaries and the other form fields around the file.
_FORM_OVERHEAD_BYTES = 64 * 1024


class UploadSizeLimit(FileUploadHandler):
    """First in request.upload_handlers: counts the bytes of each file and stops the upload past the limit.

    A Content-Length over the limit is refused before any of the body is read; a body that turns out longer
    is cut off at the limit, and Django's later handlers (which write the temporary file) never see more.
    """

    def __init__(self, limit_bytes: int, request=None) -> None:
        super().__init__(request)
        self.limit_bytes = limit_bytes
        self.exceeded = False
        self._received = 0

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        if content_length and content_length > self.limit_bytes + _FORM_OVERHEAD_BYTES:
            self.exceeded = True
            return QueryDict(), MultiValueDict()  # parsed as empty: the body is never read
        return None

    def new_file(self, *args, **kwargs) -> None:
        super().new_file(*args, **kwargs)
        self._received = 0

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        self._received += len(raw_data)
        if self._received > self.limit_bytes:
            self.exceeded = True
            raise StopUpload(connection_reset=False)
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None
