"""A job's files and the users' uploads: the job's folder and resume folder on this machine, removing a job's
files, storing and deleting an uploaded calibration file (jobs.artifact_store holds the storage itself:
MEDIA_ROOT or a bucket)."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction

from engine.errors import EngineError
from jobs import artifact_store
from jobs.models import CalibrationDataset, Job
from jobs.services import policy
from jobs.services.errors import JobStateError
from jobs.uploads import calibration_check

RESUME_FOLDER = artifact_store.RESUME_FOLDER


def job_folder(job: Job) -> Path:
    """The job's own folder on this machine: its checkpoint while it is written (local storage: for good) and
    the layers its runs compressed so far."""
    return artifact_store.local_job_folder(job.pk)


def job_resume_folder(job: Job) -> Path:
    """The layers the job's runs compressed so far (jobs.resume_folders), on the machine that ran them."""
    return job_folder(job) / RESUME_FOLDER


def job_remove_artifacts(*, job: Job, keep_resume: bool = False) -> None:
    """Delete the job's files: partial output of a cancelled or failed run, or an old checkpoint.

    keep_resume: everything but its resume folder (a new run of the job resumes from it)."""
    artifact_store.remove_job_files(job.pk, keep_resume=keep_resume)


def remove_files(job_ids: list[int], stored_names: list[str]) -> None:
    """Delete the files of these (deleted) jobs and these stored uploads; called once their rows' deletion
    committed, so that a crash in between leaves only files, which the orphan check removes."""
    for job_id in job_ids:
        artifact_store.remove_job_files(job_id)
    for name in stored_names:
        default_storage.delete(name)


def calibration_dataset_create(*, owner: AbstractBaseUser, name: str, upload: UploadedFile) -> CalibrationDataset:
    """Store an uploaded JSONL calibration file with its sha256 and usable rows, counted once as it streamed in
    (jobs.uploads); raise EngineError (field "file") when it is unusable."""
    if upload.size and upload.size > settings.COMPRESSOR_MAX_UPLOAD_BYTES:
        raise EngineError(
            f"The file is larger than the limit of {settings.COMPRESSOR_MAX_UPLOAD_BYTES // 2**20} MiB.", field="file"
        )
    check = calibration_check(upload)
    with transaction.atomic():
        policy.lock_quotas(owner)
        policy.check_stored_bytes(owner, adding=upload.size or 0)
    dataset = CalibrationDataset(
        owner=owner,
        name=(name or upload.name or "calibration.jsonl")[:200],  # a browser's file name can be longer
        sha256=check.sha256,
        size_bytes=upload.size,
        rows=check.rows,
    )
    dataset.file.save("upload.jsonl", upload, save=False)
    dataset.save()
    return dataset


def calibration_dataset_delete(*, dataset: CalibrationDataset) -> None:
    """Delete an upload and its file (its bytes leave the owner's quota); refused with JobStateError while a
    queued or running job uses it. Jobs that ended keep their record, without the file."""
    with transaction.atomic():
        policy.lock_quotas(dataset.owner)
        if dataset.jobs.filter(status__in=Job.ACTIVE).exists():
            raise JobStateError(
                f"The file '{dataset.name}' is used by a queued or running job; delete it once that job has ended."
            )
        stored_name = dataset.file.name
        dataset.delete()
        transaction.on_commit(lambda: remove_files([], [stored_name]))
