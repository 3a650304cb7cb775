"""Calibration uploads as they stream in: a size limit (an oversized file stops before it reaches the disk),
and one pass that hashes and parses each file while it is written, bounded in rows and in CPU time.

Both are installed in settings.FILE_UPLOAD_HANDLERS, so they cover the API, the job form and the admin alike.
The row count stored with the upload is what a job submission checks: no request reads the file again.
"""

from __future__ import annotations

import hashlib
import time

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler, TemporaryFileUploadHandler

from engine.calibration import JsonlRows
from engine.errors import EngineError

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


class CalibrationCheck:
    """One pass over an upload's bytes: their sha256 and the usable calibration rows, or why the file cannot
    be used (the first problem: the rest streams in unparsed, already bounded by the size limit).

    At most COMPRESSOR_MAX_UPLOAD_ROWS rows, and at most COMPRESSOR_UPLOAD_CHECK_CPU_S of this thread's CPU
    spent parsing (a slow client's time on the wire is not counted).
    """

    def __init__(self) -> None:
        self.sha256 = ""
        self.rows = 0
        self.error: EngineError | None = None
        self._digest = hashlib.sha256()
        self._parser = JsonlRows(max_rows=settings.COMPRESSOR_MAX_UPLOAD_ROWS)
        self._cpu_s = 0.0

    def feed(self, data: bytes) -> None:
        # A refused file is neither stored nor named by its hash: the rest of it costs no hashing or parsing.
        if self.error is not None:
            return
        self._digest.update(data)
        started = time.thread_time()
        try:
            self._parser.feed(data)
        except EngineError as exc:
            self.error = exc
        self._cpu_s += time.thread_time() - started
        if self.error is None and self._cpu_s > settings.COMPRESSOR_UPLOAD_CHECK_CPU_S:
            self.error = EngineError(
                f"Checking the file took too long (stopped at line {self._parser.lines:,}); upload fewer or "
                "simpler rows."
            )

    def finish(self) -> CalibrationCheck:
        self.sha256 = self._digest.hexdigest()
        if self.error is None:
            try:
                self.rows = self._parser.finish()
            except EngineError as exc:
                self.error = exc
        return self


class CheckedUploadHandler(TemporaryFileUploadHandler):
    """Django's temporary-file handler that also runs each file's CalibrationCheck on the chunks it writes;
    the uploaded file carries it as .calibration_check."""

    def new_file(self, *args, **kwargs) -> None:
        super().new_file(*args, **kwargs)
        self._check = CalibrationCheck()

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        self._check.feed(raw_data)
        if self._check.error is not None:
            return None  # the file is refused: the rest of it is not written to the disk either
        return super().receive_data_chunk(raw_data, start)

    def file_complete(self, file_size: int) -> UploadedFile:
        upload = super().file_complete(file_size)
        upload.calibration_check = self._check.finish()
        return upload


def calibration_check(upload: UploadedFile) -> CalibrationCheck:
    """The upload's check, made while it streamed in; a file that came another way (a script, a test) is
    checked now, in one pass. Raises EngineError (field "file") when the file cannot be used."""
    check = getattr(upload, "calibration_check", None)
    if check is None:
        check = CalibrationCheck()
        for chunk in upload.chunks():
            check.feed(chunk)
        check.finish()
        upload.seek(0)
    if check.error is not None:
        raise EngineError(check.error.message, field="file")
    return check
