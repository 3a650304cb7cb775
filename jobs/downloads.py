"""Checkpoint downloads: the whole folder as one streamed archive, one file with HTTP Range, the manifest.

Plain Django responses, so the API and the pages serve the same bytes. Only files listed in the job's
sha256 manifest (and the manifest itself) are ever served: a requested path is looked up there, never
joined onto the filesystem as given. Archives are produced while they are sent, one chunk at a time:
no copy of the checkpoint is built in memory or on disk.

With a bucket (COMPRESSOR_STORAGE=s3, jobs.artifact_store) one file is a redirect (302) to a presigned URL,
which serves Range requests itself; archives stream from the bucket chunk by chunk. Integrity there: every
object carries the sha256 it was uploaded with as metadata; before sending, each object's size and recorded
sha256 must match the manifest (a HEAD each), and the archive hashes each file while it streams it and cuts
the download short if the bytes differ (the client's archive is then incomplete, never silently wrong).
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from django.core.cache import cache
from django.core.files.storage import default_storage
from django.http import FileResponse, HttpResponse, HttpResponseRedirect, StreamingHttpResponse
from django.utils import timezone
from redis.exceptions import RedisError

from jobs import artifact_store
from jobs.artifact_store import CHUNK_BYTES, MANIFEST_NAME
from jobs.models import Job

ARCHIVE_KINDS = ("zip", "tar")
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


class NotDownloadable(Exception):
    """The job has no checkpoint to download (not succeeded, or its files are gone)."""


class DamagedCheckpoint(NotDownloadable):
    """A stored file no longer matches the sha256 in the manifest (bit rot, a bad disk, tampering)."""


# Files found intact, kept in the shared cache by (path, size, mtime, ctime): a file is hashed again once
# anything wrote to it, and not by each web process in turn (the first download a process served of a 16 GB
# checkpoint used to hash all of it before its first byte). Kept a week, then hashed again.
_INTACT_KEPT_S = 7 * 24 * 3600


def ensure_intact(job: Job, root: Path, paths: list[str]) -> None:
    """Refuse to send files whose sha256 differs from the job's manifest (never serve a damaged file)."""
    from engine.artifacts import sha256_file

    expected = {entry["path"]: entry["sha256"] for entry in job.manifest.get("files", [])}
    keys = {_intact_key(root / path): path for path in paths if path in expected}
    found = _cached_many(list(keys))
    for key, path in keys.items():
        if found.get(key) == expected[path]:
            continue
        if sha256_file(root / path) != expected[path]:
            raise _damaged(job, path)
        _cache_set(key, expected[path])


def _intact_key(source: Path) -> str:
    stat = source.stat()
    identity = f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}"
    return "intact:" + hashlib.sha256(identity.encode()).hexdigest()


def _cached_many(keys: list[str]) -> dict[str, str]:
    try:
        return cache.get_many(keys)
    except (RedisError, OSError):  # without the cache, every file is hashed: slower, never less safe
        return {}


def _cache_set(key: str, sha256: str) -> None:
    try:
        cache.set(key, sha256, timeout=_INTACT_KEPT_S)
    except (RedisError, OSError):
        pass


def ensure_recorded(job: Job, paths: list[str]) -> None:
    """With a bucket: refuse objects whose size or recorded sha256 differ from the job's manifest."""
    expected = {entry["path"]: (int(entry["size"]), entry["sha256"]) for entry in job.manifest.get("files", [])}
    for path in paths:
        if path in expected and artifact_store.recorded_sha256(_name(job, path)) != expected[path]:
            raise _damaged(job, path)


def _damaged(job: Job, path: str) -> DamagedCheckpoint:
    return DamagedCheckpoint(
        f"The stored file '{path}' of job {job.pk} is damaged: its sha256 does not match the "
        "manifest. It is not sent; the job can be retried to produce a new checkpoint."
    )


def checkpoint_dir(job: Job) -> Path:
    """The checkpoint's local folder (local storage only)."""
    _require_succeeded(job)
    root = Path(default_storage.path(job.artifacts_path))
    if not root.is_dir():
        raise _gone(job)
    return root


def _require_checkpoint(job: Job) -> None:
    """A succeeded job whose checkpoint is stored whole (with a bucket: its manifest, uploaded last, is there)."""
    if not artifact_store.uses_bucket():
        checkpoint_dir(job)
        return
    _require_succeeded(job)
    if not artifact_store.stored_exists(_name(job, MANIFEST_NAME)):
        raise _gone(job)


def _require_succeeded(job: Job) -> None:
    if job.status != Job.Status.SUCCEEDED or not job.artifacts_path or not job.manifest:
        raise NotDownloadable(f"Job {job.pk} has no checkpoint to download (it is {job.status}).")


def _gone(job: Job) -> NotDownloadable:
    return NotDownloadable(f"The checkpoint of job {job.pk} is no longer stored on this server.")


def _name(job: Job, path: str) -> str:
    """A checkpoint file's name in the storage."""
    return f"{job.artifacts_path}/{path}"


def _check_intact(job: Job, paths: list[str]) -> None:
    if artifact_store.uses_bucket():
        ensure_recorded(job, paths)
    else:
        ensure_intact(job, checkpoint_dir(job), paths)


def checkpoint_text(job: Job, path: str, *, max_bytes: int) -> str | None:
    """A small checkpoint file's text (the model card); None when it is absent or larger than max_bytes."""
    _require_checkpoint(job)
    name = _name(job, path)
    if not artifact_store.stored_exists(name) or artifact_store.stored_size(name) > max_bytes:
        return None
    return b"".join(artifact_store.read_chunks(name)).decode(errors="replace")


def archive_name(job: Job) -> str:
    model = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(job.model_source).name or job.model_source).strip("-")
    return f"job-{job.pk}-{model}-{job.preset or 'custom'}"


def checksums_response(job: Job) -> HttpResponse:
    """The manifest in `sha256sum` format ("<hash>  <path>" per line): in the unpacked archive's folder,
    `sha256sum -c SHA256SUMS` checks every file."""
    _require_checkpoint(job)
    lines = [f"{entry['sha256']}  {entry['path']}\n" for entry in job.manifest.get("files", [])]
    response = HttpResponse("".join(lines), content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="SHA256SUMS"'
    return response


def _entries(job: Job) -> list[tuple[str, int]]:
    """(relative path, size) of every file to send: the manifest's files, then the manifest."""
    _require_checkpoint(job)
    files = [(entry["path"], int(entry["size"])) for entry in job.manifest.get("files", [])]
    return [*files, (MANIFEST_NAME, artifact_store.stored_size(_name(job, MANIFEST_NAME)))]


# --- the archive ---------------------------------------------------------------------------------------


def archive_response(job: Job, *, kind: str = "zip") -> StreamingHttpResponse:
    """The whole checkpoint as job-<id>-<model>-<preset>.zip or .tar, streamed."""
    if kind not in ARCHIVE_KINDS:
        raise ValueError(f"Unknown archive kind '{kind}'; use zip or tar.")
    entries, name = _entries(job), archive_name(job)
    _check_intact(job, [path for path, _size in entries])
    read = _reader(job)
    if kind == "zip":
        modified = (job.finished_at or timezone.now()).timetuple()[:6]
        response = StreamingHttpResponse(_zip_stream(read, entries, name, modified), content_type="application/zip")
        # Known ahead, like the tar's: a client shows the download's progress, and the server sends it as it
        # is instead of in chunked framing (half the speed under gunicorn).
        response["Content-Length"] = str(zip_length(entries, name))
    else:
        headers = [(_tar_header(f"{name}/{path}", size), path, size) for path, size in entries]
        response = StreamingHttpResponse(_tar_stream(read, headers), content_type="application/x-tar")
        response["Content-Length"] = str(sum(len(h) + size + (-size % 512) for h, _p, size in headers) + 1024)
    response["Content-Disposition"] = f'attachment; filename="{name}.{kind}"'
    return response


class _Sink:
    """A write-only, unseekable file for zipfile: it collects what is written until taken."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._position = 0

    def write(self, data: bytes) -> int:
        self._chunks.append(bytes(data))
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self._chunks = b"".join(self._chunks), []
        return data


Reader = Callable[[str], Iterator[bytes]]  # a checkpoint file's bytes, chunk by chunk, by its manifest path


def _reader(job: Job) -> Reader:
    """Local files are read as they are (ensure_intact hashed them); bucket objects are hashed as they stream."""
    if not artifact_store.uses_bucket():
        root = checkpoint_dir(job)
        return lambda path: _read_span(root / path, 0, (root / path).stat().st_size)
    expected = {entry["path"]: entry["sha256"] for entry in job.manifest.get("files", [])}

    def read(path: str) -> Iterator[bytes]:
        digest = hashlib.sha256()
        for chunk in artifact_store.read_chunks(_name(job, path)):
            digest.update(chunk)
            yield chunk
        if path in expected and digest.hexdigest() != expected[path]:
            raise _damaged(job, path)  # the response stops here: the client sees a short archive

    return read


def _zip_stream(read: Reader, entries: list[tuple[str, int]], prefix: str, modified: tuple) -> Iterator[bytes]:
    # Stored, not deflated: weights do not compress, and this keeps the CPU free. zipfile writes data
    # descriptors (sizes after the data) because the sink cannot seek; ZIP64 for files over 4 GiB.
    sink = _Sink()
    with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for path, size in entries:
            info = zipfile.ZipInfo(f"{prefix}/{path}", date_time=modified)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            info.file_size = size  # decides ZIP64 for this entry
            with archive.open(info, mode="w") as dst:
                for chunk in read(path):
                    dst.write(chunk)
                    yield sink.take()
            yield sink.take()
    yield sink.take()


def zip_length(entries: list[tuple[str, int]], prefix: str) -> int:
    """The exact length of what _zip_stream writes for these files, by the layout zipfile gives a stored
    archive on an unseekable file: per file a local header (ZIP64 sizes when the file is near 2 GiB), the data
    and a data descriptor; then the central directory (ZIP64 sizes and offsets past 2 GiB) and the end
    records (ZIP64 ones when the directory lies past 2 GiB or holds more than 65 535 files)."""
    limit = zipfile.ZIP64_LIMIT
    offset = directory = 0
    for path, size in entries:
        name_bytes = len(_zip_name(f"{prefix}/{path}"))
        zip64 = size * 1.05 > limit  # zipfile's own rule when the size is given ahead
        wide = (2 if size > limit else 0) + (1 if offset > limit else 0)  # 8-byte fields of the directory entry
        directory += zipfile.sizeCentralDir + name_bytes + (4 + 8 * wide if wide else 0)
        offset += zipfile.sizeFileHeader + name_bytes + (20 if zip64 else 0) + size + (24 if zip64 else 16)
    end = zipfile.sizeEndCentDir
    if len(entries) > zipfile.ZIP_FILECOUNT_LIMIT or offset > limit or directory > limit:
        end += zipfile.sizeEndCentDir64 + zipfile.sizeEndCentDir64Locator
    return offset + directory + end


def _zip_name(name: str) -> bytes:
    try:
        return name.encode("ascii")
    except UnicodeEncodeError:
        return name.encode("utf-8")


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _tar_stream(read: Reader, headers: list[tuple[bytes, str, int]]) -> Iterator[bytes]:
    # A tar file is header, data padded to 512 bytes, for each file, then two empty blocks.
    for header, path, size in headers:
        yield header
        yield from read(path)
        yield b"\0" * (-size % 512)
    yield b"\0" * 1024


# --- one file, with Range ------------------------------------------------------------------------------


def file_response(job: Job, *, path: str, range_header: str | None, if_range: str | None = None) -> HttpResponse:
    """One checkpoint file. `Range: bytes=a-b` (one range) gets 206 with those bytes; past the end, 416.

    With a bucket: a redirect to a presigned URL of the object (the bucket answers Range and If-Range)."""
    _require_checkpoint(job)
    entry = next((e for e in job.manifest.get("files", []) if e["path"] == path), None)
    if entry is None and path != MANIFEST_NAME:
        raise FileNotFoundError(path)
    _check_intact(job, [path])
    if artifact_store.uses_bucket():
        return HttpResponseRedirect(artifact_store.download_url(_name(job, path), filename=Path(path).name))
    root = checkpoint_dir(job)
    source = root / path
    size = source.stat().st_size
    etag = f'"{entry["sha256"]}"' if entry else None
    content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    wanted = _parse_range(range_header, size) if range_header else None
    if wanted is not None and if_range is not None and if_range != etag:
        wanted = None  # the client's copy is of another version: send the whole file
    if wanted == "unsatisfiable":
        response = HttpResponse(
            f"The range starts past the end of the file ({size} bytes).\n",
            status=416,
            content_type="text/plain; charset=utf-8",
        )
        response["Content-Range"] = f"bytes */{size}"
    elif wanted is None:
        response = FileResponse(source.open("rb"), content_type=content_type)
        response.block_size = CHUNK_BYTES  # the 4 KiB default costs a third of loopback throughput
        response["Content-Length"] = str(size)
    else:
        start, end = wanted
        response = StreamingHttpResponse(
            _read_span(source, start, end - start + 1), status=206, content_type=content_type
        )
        response["Content-Range"] = f"bytes {start}-{end}/{size}"
        response["Content-Length"] = str(end - start + 1)
    response["Accept-Ranges"] = "bytes"
    response["Content-Disposition"] = f'attachment; filename="{Path(path).name}"'
    if etag:
        response["ETag"] = etag
    return response


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """(first, last) byte, "unsatisfiable", or None to send everything (absent, malformed or multi-range)."""
    match = _RANGE.match(header)
    if not match:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last N bytes
        count = _byte_number(last)
        if count == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - count), size - 1
    start = _byte_number(first)
    end = min(_byte_number(last), size - 1) if last else size - 1
    if last and _byte_number(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, end


def _byte_number(digits: str) -> int:
    """A byte position; one of more than 18 digits is past the end of any file (and int() refuses 4,300)."""
    return int(digits) if len(digits) <= 18 else 10**18


def _read_span(path: Path, start: int, length: int) -> Iterator[bytes]:
    with path.open("rb") as src:
        src.seek(start)
        while length > 0:
            chunk = src.read(min(CHUNK_BYTES, length))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk


def manifest_response(job: Job) -> HttpResponse:
    """The checkpoint's manifest.json: every file's path, size and sha256."""
    _require_checkpoint(job)
    if artifact_store.uses_bucket():
        body = b"".join(artifact_store.read_chunks(_name(job, MANIFEST_NAME)))
        response = HttpResponse(body, content_type="application/json")
    else:
        response = FileResponse((checkpoint_dir(job) / MANIFEST_NAME).open("rb"), content_type="application/json")
    response["Content-Disposition"] = f'inline; filename="{MANIFEST_NAME}"'
    return response
