"""Retention deletes expired checkpoints and uploads with their rows; the orphan check finds files without
rows and rows without files (a service and `manage.py check_orphans`)."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.files.base import ContentFile
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from jobs.models import CalibrationDataset, Job, JobLogLine
from jobs.services import job_log, retention
from jobs.tasks import expire_artifacts


def media() -> Path:
    return Path(django_settings.MEDIA_ROOT)


def succeeded(make_job, owner, *, ended_days_ago: float, **fields) -> Job:
    """A succeeded job with a small published checkpoint folder."""
    job = make_job(owner, status=Job.Status.SUCCEEDED, **fields)
    job.artifacts_path = job.artifacts_relpath()
    job.finished_at = timezone.now() - timedelta(days=ended_days_ago)
    job.save()
    folder = media() / job.artifacts_path
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    return job


def upload(owner, *, days_old: float) -> CalibrationDataset:
    dataset = CalibrationDataset(owner=owner, name="rows", sha256="0" * 64)
    dataset.file.save("rows.jsonl", ContentFile(b'{"text": "hello"}\n'))
    CalibrationDataset.objects.filter(pk=dataset.pk).update(created_at=timezone.now() - timedelta(days=days_old))
    return dataset


@pytest.fixture
def clean_media():
    """The orphan check looks at the whole media folder: start and end with no jobs or uploads in it."""
    import shutil

    for name in ("jobs", "calibration"):
        shutil.rmtree(media() / name, ignore_errors=True)
    yield
    for name in ("jobs", "calibration"):
        shutil.rmtree(media() / name, ignore_errors=True)


def test_the_hourly_light_task_deletes_expired_checkpoints_and_uploads_with_their_rows(
    make_user, make_job, settings, django_capture_on_commit_callbacks, clean_media
):
    # Given a retention of 30 days, an old and a recent checkpoint, an old unused upload and an old one in use
    settings.COMPRESSOR_RETENTION_DAYS = 30
    alice = make_user("alice")
    old, recent = succeeded(make_job, alice, ended_days_ago=31), succeeded(make_job, alice, ended_days_ago=29)
    job_log.job_log_append(job_id=old.pk, lines=[("done", "old line")])
    unused, in_use = upload(alice, days_old=40), upload(alice, days_old=40)
    make_job(alice, status=Job.Status.QUEUED, calibration_kind="upload", calibration_file=in_use)

    # When the periodic task runs
    with django_capture_on_commit_callbacks(execute=True):
        expire_artifacts()

    # Then the expired job, its log and folder, and the unused upload with its file are gone; the rest stays
    assert not Job.objects.filter(pk=old.pk).exists() and not JobLogLine.objects.filter(job_id=old.pk).exists()
    assert not (media() / f"jobs/{old.pk}").exists()
    assert (media() / recent.artifacts_path / "model.safetensors").is_file()
    assert list(CalibrationDataset.objects.values_list("pk", flat=True)) == [in_use.pk]
    assert not (media() / unused.file.name).exists() and (media() / in_use.file.name).is_file()
    assert not retention.orphans_find()
    schedule = django_settings.CELERY_BEAT_SCHEDULE["expire-artifacts"]
    assert schedule["task"] == "jobs.expire_artifacts" and schedule["options"]["queue"] == "light"


def test_orphan_check_finds_files_without_rows_and_rows_without_files(make_user, make_job, clean_media):
    # Given a clean state: a succeeded job with its checkpoint, a running job writing, an upload
    alice = make_user("alice")
    kept = succeeded(make_job, alice, ended_days_ago=1)
    running = make_job(alice, status=Job.Status.RUNNING)
    (media() / f"jobs/{running.pk}/.checkpoint.partial-abc").mkdir(parents=True)
    dataset = upload(alice, days_old=0)
    assert not retention.orphans_find()

    # When files lose their rows and rows their files
    (media() / "jobs/999999/checkpoint").mkdir(parents=True)  # a deleted job's folder
    failed = make_job(alice, status=Job.Status.FAILED)
    (media() / f"jobs/{failed.pk}/.checkpoint.partial-xyz").mkdir(parents=True)  # a killed run's leftovers
    (media() / f"calibration/{alice.pk}/stray.jsonl").write_text("{}")
    gone = succeeded(make_job, alice, ended_days_ago=1)
    (media() / gone.artifacts_path / "model.safetensors").unlink()
    (media() / gone.artifacts_path).rmdir()
    (media() / dataset.file.name).unlink()

    # Then the service and the command name each one
    orphans = retention.orphans_find()
    assert sorted(orphans.files_without_rows) == sorted(
        ["jobs/999999", f"jobs/{failed.pk}/.checkpoint.partial-xyz", f"calibration/{alice.pk}/stray.jsonl"]
    )
    assert sorted(orphans.rows_without_files) == sorted(
        [f"job {gone.pk}: {gone.artifacts_path}", f"calibration dataset {dataset.pk}: {dataset.file.name}"]
    )
    out = StringIO()
    with pytest.raises(CommandError, match="3 files without rows, 2 rows without files"):
        call_command("check_orphans", stdout=out)
    assert f"row without its files: job {gone.pk}" in out.getvalue()

    # And --delete removes the files without rows, never a checkpoint that has its row
    with pytest.raises(CommandError, match="0 files without rows, 2 rows without files"):
        call_command("check_orphans", "--delete", stdout=StringIO())
    assert not (media() / "jobs/999999").exists() and not any((media() / f"jobs/{failed.pk}").iterdir())
    assert (media() / kept.artifacts_path / "model.safetensors").is_file()
    assert (media() / f"jobs/{running.pk}/.checkpoint.partial-abc").is_dir()
