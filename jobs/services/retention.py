"""What the storage keeps: ended jobs and unused uploads expire after COMPRESSOR_RETENTION_DAYS, files that no
row accounts for (and rows whose files are gone) are found and removed, and the temporary checkpoint folders
of runs that are over are cleaned up."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from jobs import artifact_store
from jobs.models import CalibrationDataset, Job
from jobs.services import storage
from jobs.services.transitions import Action, allowed

Status = Job.Status


class Expired(NamedTuple):
    jobs: list[int]
    uploads: list[int]


def artifacts_expire(*, now: datetime | None = None) -> Expired:
    """Delete what is older than COMPRESSOR_RETENTION_DAYS (0 keeps everything): ended jobs with their rows,
    log lines and folders, then uploads no remaining job uses.

    Rows go first, in one transaction; the files once it commits. A crash in between leaves only files
    without rows, which the orphan check (orphans_find) reports and removes; never a row whose files are gone.
    """
    days = settings.COMPRESSOR_RETENTION_DAYS
    if days <= 0:
        return Expired(jobs=[], uploads=[])
    cutoff = (now or timezone.now()) - timedelta(days=days)
    ended_before = Q(finished_at__lt=cutoff) | Q(finished_at__isnull=True, created_at__lt=cutoff)
    with transaction.atomic():
        jobs = allowed(Job.objects.select_for_update().filter(ended_before), Action.DELETE)
        job_ids = list(jobs.values_list("pk", flat=True))
        Job.objects.filter(pk__in=job_ids).delete()
        uploads = CalibrationDataset.objects.filter(created_at__lt=cutoff, jobs__isnull=True)
        upload_files = dict(uploads.values_list("pk", "file"))
        CalibrationDataset.objects.filter(pk__in=upload_files).delete()
        transaction.on_commit(lambda: storage.remove_files(job_ids, list(upload_files.values())))
    return Expired(jobs=job_ids, uploads=list(upload_files))


@dataclass
class Orphans:
    """Stored files that no row accounts for, and rows whose files are gone (names in the storage)."""

    files_without_rows: list[str]
    rows_without_files: list[str]

    def __bool__(self) -> bool:
        return bool(self.files_without_rows or self.rows_without_files)


def orphans_find() -> Orphans:
    """Compare the job folders and uploads in the storage (MEDIA_ROOT or the bucket) with the rows.

    A job folder may hold only its published checkpoint (succeeded jobs) or the resume folder a failed job keeps
    for its retry; a queued or running job's folder is
    left alone (its run writes there). Anything else is an orphan: a folder of a deleted job, a checkpoint
    of a job that did not succeed, a stale temporary folder of a killed run, an upload without its row.
    """
    files: list[str] = []
    jobs = {job.pk: job for job in Job.objects.only("pk", "status", "artifacts_path")}
    for name in artifact_store.list_names("jobs"):
        job = jobs.get(int(name)) if name.isdigit() else None
        if job is None:
            files.append(f"jobs/{name}")
        elif job.status not in Job.ACTIVE:
            published = job.artifacts_path if job.status == Status.SUCCEEDED and job.artifacts_path else None
            # A failed job keeps the layers it compressed for its retry (jobs.resume_folders).
            resume = f"jobs/{name}/{storage.RESUME_FOLDER}" if job.status == Status.FAILED else None
            entries = [f"jobs/{name}/{entry}" for entry in artifact_store.list_names(f"jobs/{name}")]
            files += [entry for entry in entries if entry not in (published, resume)]
    uploads = dict(CalibrationDataset.objects.values_list("file", "pk"))
    files += [name for name in artifact_store.walk_files("calibration") if name not in uploads]
    rows = [
        f"job {job.pk}: {job.artifacts_path}"
        for job in jobs.values()
        if job.status == Status.SUCCEEDED
        and not (job.artifacts_path and artifact_store.checkpoint_stored(job.artifacts_path))
    ]
    rows += [f"calibration dataset {pk}: {name}" for name, pk in uploads.items() if not default_storage.exists(name)]
    return Orphans(files_without_rows=files, rows_without_files=rows)


def orphans_remove(orphans: Orphans) -> None:
    """Delete the files no row accounts for (the rows without files are for an operator to look at)."""
    for name in orphans.files_without_rows:
        artifact_store.remove_name(name)


def job_remove_stale_partials() -> list[Path | str]:
    """Remove the temporary checkpoint folders of runs that are over (killed during a save, out of memory,
    a lost worker), and with a bucket their unfinished uploads; a running job's own files are left alone.
    Returns what it removed (jobs.artifact_store.remove_stale_partials)."""
    return artifact_store.remove_stale_partials()
