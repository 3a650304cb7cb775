"""jobs.resume_folders and the services around it: who keeps a job's resume folder (the layers its runs compressed),
who takes it over, and when it goes (database and files only; tests/faults/test_resume.py kills a real run).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from jobs.inputs import JobInput
from jobs.models import Job
from jobs.resume_folders import job_take_resume_folder
from jobs.services import lifecycle, retention, storage, submissions

pytestmark = pytest.mark.django_db

GPTQ = JobInput(preset="int8-w8a8-gptq", calibration_kind="builtin", calibration_samples=8)


@pytest.fixture(autouse=True)
def no_job_folders(media_root):
    """Job ids repeat after rolled-back tests: no folder of an earlier test's job is taken for this one's."""
    shutil.rmtree(Path(media_root) / "jobs", ignore_errors=True)


def _with_stored_layers(job: Job) -> None:
    folder = storage.job_resume_folder(job)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.json").write_text('{"done": [0]}')
    (folder / "layer-00000.safetensors").write_bytes(b"layer 0")


def _failed(job: Job) -> Job:
    Job.objects.filter(pk=job.pk).update(status=Job.Status.FAILED, error="The job ran out of memory.")
    job.refresh_from_db()
    return job


def test_a_retry_of_a_failed_job_takes_over_its_stored_layers(user):
    # Given a failed GPTQ job that stored a layer before it failed
    failed = _failed(submissions.job_submit(owner=user, data=GPTQ).job)
    _with_stored_layers(failed)

    # When it is retried and the retry's run starts
    retry = submissions.job_retry(job=failed)
    folder = job_take_resume_folder(job=retry)

    # Then the retry's run resumes from those layers, which the failed job no longer holds
    assert (
        folder == storage.job_resume_folder(retry) and (folder / "layer-00000.safetensors").read_bytes() == b"layer 0"
    )
    assert not storage.job_resume_folder(failed).exists()


def test_a_clone_with_another_request_or_a_retry_of_a_cancelled_job_starts_over(user):
    # Given a failed job with a stored layer, cloned with another calibration
    failed = _failed(submissions.job_submit(owner=user, data=GPTQ).job)
    _with_stored_layers(failed)
    clone = submissions.job_clone(job=failed, owner=user, data=dataclasses.replace(GPTQ, calibration_samples=16)).job

    # When the clone's run starts, then it does not take the layers (they stay for the failed job's retry)
    assert not job_take_resume_folder(job=clone).exists()
    assert storage.job_resume_folder(failed).is_dir()

    # Given a cancelled job (its folder went with the cancel; a stray resume folder is not taken either)
    Job.objects.filter(pk=failed.pk).update(status=Job.Status.CANCELLED)
    failed.refresh_from_db()
    retry = submissions.job_retry(job=failed)
    assert not job_take_resume_folder(job=retry).exists()


def test_a_run_that_failed_keeps_its_stored_layers_and_a_cancelled_or_new_run_removes_the_rest(user, make_job):
    # Given a job folder with a stored layer and the partial checkpoint folder of a run
    job = make_job(user, status=Job.Status.RUNNING)
    _with_stored_layers(job)
    partial = storage.job_folder(job) / ".checkpoint.partial-x"
    partial.mkdir()

    # When a failed run's output is discarded (or a new run of the job starts), then only the layers stay
    lifecycle.job_discard_run_output(job_id=job.pk, task_id=job.celery_task_id, keep_resume=True)
    assert sorted(p.name for p in storage.job_folder(job).iterdir()) == ["resume"]

    # ...the orphan check accounts for them while the job is failed (its retry may resume from them)
    _failed(job)
    assert not [name for name in retention.orphans_find().files_without_rows if name.startswith(f"jobs/{job.pk}/")]

    # When the job is cancelled instead, then its whole folder goes
    lifecycle.job_discard_run_output(job_id=job.pk, task_id=job.celery_task_id)
    assert not storage.job_folder(job).exists()
