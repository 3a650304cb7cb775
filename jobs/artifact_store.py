"""Where a job's checkpoint lives: the local folder (MEDIA_ROOT) or an S3-compatible bucket (COMPRESSOR_STORAGE).

Local: the worker writes straight into MEDIA_ROOT/jobs/<id>/checkpoint (the engine publishes it by an atomic
rename) and the web side reads the same folder. Bucket: the worker writes into its own scratch folder
(COMPRESSOR_SCRATCH_DIR) and, once the checkpoint is complete and its manifest written, uploads it with boto3's
managed transfer (multipart, streamed from the file, retried), every object with its sha256 as metadata and the
manifest last; the scratch copy is then removed. A multipart object appears under its name only when its upload
completes, and a job is downloadable only once it succeeded with a manifest object, so a killed upload never
shows a partial checkpoint. Housekeeping aborts the multipart uploads of runs that are over and deletes the
objects of jobs that did not succeed.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.core.files.storage import default_storage

from engine.units import size_text
from jobs.models import Job

MANIFEST_NAME = "manifest.json"
CHUNK_BYTES = 1024 * 1024
SHA256_KEY = "sha256"  # object metadata (x-amz-meta-sha256) set at upload


RESUME_FOLDER = "resume"  # in the job's local folder: the layers its runs compressed so far (jobs.resume_folders)


def uses_bucket() -> bool:
    return settings.COMPRESSOR_STORAGE == "s3"


def job_prefix(job_id: int) -> str:
    return f"jobs/{job_id}"


def work_folder(job: Job) -> Path:
    """Where the worker writes this job's checkpoint (the engine's out_dir)."""
    if uses_bucket():
        return Path(settings.COMPRESSOR_SCRATCH_DIR) / job.artifacts_relpath()
    return Path(default_storage.path(job.artifacts_relpath()))


def publish(job: Job, folder: Path, manifest: dict, *, log: Callable[[str], None] | None = None) -> None:
    """Make a complete checkpoint downloadable: in place already when local; uploaded (manifest last) to a bucket."""
    if not uses_bucket():
        return
    if log is not None:
        log(f"Uploading the checkpoint ({len(manifest['files'])} files, {size_text(manifest['total_bytes'])}).")
    relpath = job.artifacts_relpath()
    for entry in manifest["files"]:
        _upload(folder / entry["path"], f"{relpath}/{entry['path']}", entry["sha256"])
    from engine.artifacts import sha256_file

    manifest_path = folder / MANIFEST_NAME
    _upload(manifest_path, f"{relpath}/{MANIFEST_NAME}", sha256_file(manifest_path))
    shutil.rmtree(folder.parent, ignore_errors=True)  # the scratch copy: the bucket holds the checkpoint now


def local_job_folder(job_id: int) -> Path:
    """The job's folder on this machine: under MEDIA_ROOT when local, in the scratch folder with a bucket."""
    if uses_bucket():
        return Path(settings.COMPRESSOR_SCRATCH_DIR) / job_prefix(job_id)
    return Path(default_storage.path(job_prefix(job_id)))


def remove_job_files(job_id: int, *, keep_resume: bool = False) -> None:
    """Delete everything of one job: its folder, and in a bucket its scratch copy, objects and open uploads.

    keep_resume: its local resume folder stays (jobs.resume_folders; never in a bucket: it is the worker's own)."""
    _remove_local_folder(local_job_folder(job_id), keep=RESUME_FOLDER if keep_resume else None)
    if not uses_bucket():
        return
    prefix = _key(job_prefix(job_id)) + "/"
    for upload in _multipart_uploads(prefix):
        _abort(upload)
    _bucket().objects.filter(Prefix=prefix).delete()


def _remove_local_folder(folder: Path, *, keep: str | None) -> None:
    if keep is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for entry in folder.iterdir() if folder.is_dir() else ():
        if entry.name == keep:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def remove_stale_partials() -> list[Path | str]:
    """Remove what runs that are over left behind; a running job's own files are left alone.

    Local: the engine's temporary folders. Bucket, besides those in the scratch folder: scratch copies of jobs
    no longer running, multipart uploads of a job that is not running (or begun before its current run
    started), and objects of jobs that ended without succeeding. Returns what it removed: folders, and the
    bucket's uploads and objects by name.
    """
    from engine.artifacts import staging_folders

    root = Path(settings.COMPRESSOR_SCRATCH_DIR if uses_bucket() else default_storage.path(""))
    folders = sorted((root / "jobs").glob("*")) if (root / "jobs").is_dir() else []
    running = _running_jobs(_job_ids(folder.name for folder in folders))
    partials = [path for path in staging_folders(folders) if path.parent.name not in running]
    if uses_bucket():
        partials += [folder for folder in folders if folder.name not in running and folder not in partials]
    for path in partials:
        shutil.rmtree(path, ignore_errors=True)
    removed: list[Path | str] = list(partials)
    if uses_bucket():
        removed += _remove_stale_uploads() + _remove_objects_of_unsuccessful_jobs() + _remove_unused_upload_copies()
    return removed


# A calibration upload's local copy (local_copy) not read for a day is removed; the bucket keeps the upload.
UPLOAD_COPY_MAX_IDLE_S = 24 * 3600


def _remove_unused_upload_copies() -> list[Path]:
    """The scratch copies of calibration uploads that no job read for UPLOAD_COPY_MAX_IDLE_S (each read touches
    its copy), and copies half-written by a process that died."""
    folder = Path(settings.COMPRESSOR_SCRATCH_DIR) / "uploads"
    cutoff = time.time() - UPLOAD_COPY_MAX_IDLE_S
    stale = [path for path in folder.glob("*") if path.is_file() and path.stat().st_mtime < cutoff]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _job_ids(names: Iterable[str]) -> list[int]:
    return [int(name) for name in names if name.isdigit()]


def _running_jobs(ids: list[int]) -> dict[str, Job]:
    """str(job id) -> job, for those of these jobs that are running now."""
    running = Job.objects.filter(pk__in=ids, status=Job.Status.RUNNING).only("pk", "started_at")
    return {str(job.pk): job for job in running}


def _remove_stale_uploads() -> list[str]:
    uploads = list(_multipart_uploads(_key("jobs") + "/"))
    running = _running_jobs(_job_ids(_job_name_of(upload["Key"]) for upload in uploads))
    stale = []
    for upload in uploads:
        job = running.get(_job_name_of(upload["Key"]))
        if job is None or (job.started_at and upload["Initiated"] < job.started_at):
            _abort(upload)
            stale.append(f"upload of {upload['Key']}")
    return stale


def _remove_objects_of_unsuccessful_jobs() -> list[str]:
    listing = (
        _client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=_bucket_name(), Prefix=_key("jobs") + "/", Delimiter="/")
    )
    names = [PurePosixPath(p["Prefix"]).name for page in listing for p in page.get("CommonPrefixes", [])]
    ended = Job.objects.filter(pk__in=_job_ids(names), status__in=Job.TERMINAL).exclude(status=Job.Status.SUCCEEDED)
    removed = []
    for job_id in ended.values_list("pk", flat=True):
        remove_job_files(job_id)
        removed.append(f"objects of job {job_id}")
    return removed


def _job_name_of(key: str) -> str:
    """The job id's folder name in an object key "[location/]jobs/<id>/..."."""
    parts = PurePosixPath(key).parts
    return parts[parts.index("jobs") + 1] if "jobs" in parts[:-1] else ""


# --- reading a stored checkpoint (both backends, through the storage API or the bucket) -------------------


def stored_exists(name: str) -> bool:
    return default_storage.exists(name)


def stored_size(name: str) -> int:
    return default_storage.size(name)


def read_chunks(name: str, *, start: int = 0, length: int | None = None) -> Iterator[bytes]:
    """A stored file's bytes from start, CHUNK_BYTES at a time: never the whole file in memory.

    (S3Storage's own file object downloads the whole object before the first read, so the bucket is read
    with a ranged GET instead.)
    """
    if uses_bucket():
        last = "" if length is None else str(start + length - 1)
        ranged = {"Range": f"bytes={start}-{last}"} if start or length is not None else {}
        body = _client().get_object(Bucket=_bucket_name(), Key=_key(name), **ranged)["Body"]
        try:
            yield from body.iter_chunks(CHUNK_BYTES)
        finally:
            body.close()
        return
    with default_storage.open(name, "rb") as src:
        src.seek(start)
        left = length
        while left is None or left > 0:
            chunk = src.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            yield chunk


def recorded_sha256(name: str) -> tuple[int, str]:
    """A bucket object's size and the sha256 recorded as its metadata at upload (one HEAD request)."""
    head = _client().head_object(Bucket=_bucket_name(), Key=_key(name))
    return int(head["ContentLength"]), head.get("Metadata", {}).get(SHA256_KEY, "")


def download_url(name: str, *, filename: str) -> str:
    """A presigned GET of a bucket object that the browser saves as filename (Range requests work on it)."""
    disposition = f'attachment; filename="{filename}"'
    return default_storage.url(name, parameters={"ResponseContentDisposition": disposition})


def checkpoint_stored(relpath: str) -> bool:
    """Whether a published checkpoint is there: its folder, or in a bucket its manifest (uploaded last)."""
    if uses_bucket():
        return stored_exists(f"{relpath}/{MANIFEST_NAME}")
    return Path(default_storage.path(relpath)).is_dir()


def list_names(name: str) -> list[str]:
    """The folders and files directly in a stored folder, sorted (none when it does not exist)."""
    try:
        folders, files = default_storage.listdir(name)
    except FileNotFoundError:
        return []
    return sorted([*folders, *files])


def walk_files(name: str) -> list[str]:
    """Every stored file below a folder, by its full name."""
    try:
        folders, files = default_storage.listdir(name)
    except FileNotFoundError:
        return []
    below = [found for folder in folders for found in walk_files(f"{name}/{folder}")]
    return sorted([*(f"{name}/{file}" for file in files), *below])


def remove_name(name: str) -> None:
    """Delete a stored file or a whole stored folder."""
    if uses_bucket():
        _bucket().objects.filter(Prefix=_key(name) + "/").delete()
        default_storage.delete(name)
        return
    path = Path(default_storage.path(name))
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def local_copy(name: str, *, sha256: str) -> Path:
    """A stored file (a calibration upload) as a local path the engine can read: the file itself when local;
    from a bucket, a copy read through storage.open into the scratch folder, kept by content for later jobs."""
    if not uses_bucket():
        return Path(default_storage.path(name))
    target = Path(settings.COMPRESSOR_SCRATCH_DIR) / "uploads" / f"{sha256}{PurePosixPath(name).suffix}"
    if target.is_file():
        os.utime(target)  # read now: housekeeping keeps it (_remove_unused_upload_copies)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    with default_storage.open(name, "rb") as src, partial.open("wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK_BYTES)
    os.replace(partial, target)  # two processes copying the same file each rename a whole copy
    return target


# --- the bucket ------------------------------------------------------------------------------------------


def _bucket():
    return default_storage.bucket


def _bucket_name() -> str:
    return default_storage.bucket_name


def _client():
    return default_storage.connection.meta.client


def _key(name: str) -> str:
    location = default_storage.location.strip("/")
    return f"{location}/{name}" if location else name


def _upload(path: Path, name: str, sha256: str) -> None:
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(
        multipart_threshold=settings.COMPRESSOR_S3_MULTIPART_THRESHOLD_BYTES,
        multipart_chunksize=settings.COMPRESSOR_S3_MULTIPART_CHUNK_BYTES,
        max_bandwidth=settings.COMPRESSOR_S3_MAX_BANDWIDTH,
    )
    _client().upload_file(
        str(path), _bucket_name(), _key(name), ExtraArgs={"Metadata": {SHA256_KEY: sha256}}, Config=config
    )


def _multipart_uploads(prefix: str) -> Iterator[dict]:
    pages = _client().get_paginator("list_multipart_uploads").paginate(Bucket=_bucket_name(), Prefix=prefix)
    for page in pages:
        yield from page.get("Uploads", [])


def _abort(upload: dict) -> None:
    _client().abort_multipart_upload(Bucket=_bucket_name(), Key=upload["Key"], UploadId=upload["UploadId"])
