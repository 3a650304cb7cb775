"""Checkpoints in an S3-compatible bucket (COMPRESSOR_STORAGE=s3): a real moto server over HTTP, a real Celery
worker writing through it, and the web side downloading from it (presigned redirects, streamed archives).

The worker is this module's own, on a queue of its own, so it never takes the other modules' jobs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import tarfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests
from django.test import Client, override_settings

from jobs import artifact_store
from jobs.models import Job
from jobs.services import lifecycle, retention
from tests.s3_server import CREDENTIALS, S3Server
from tests.support import LiveWorker, running_worker, wait_until, worker_env

pytestmark = pytest.mark.slow

QUEUE = "s3-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[S3Server]:
    """A moto S3 server on a free port with a fresh bucket; this process's boto3 gets the test keys."""
    saved = {key: os.environ.get(key) for key in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = S3Server(bucket=f"checkpoints-{uuid.uuid4().hex[:8]}").start()
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scratch")


@pytest.fixture
def on_s3(s3, scratch) -> Iterator[S3Server]:
    """The test process (the web side) stores in the bucket too; the bucket is emptied after the test."""
    with override_settings(**s3.django_settings(scratch)):
        yield s3
    s3.empty()


@pytest.fixture
def s3_worker(django_db_setup, broker, media_root, s3, scratch, tmp_path_factory, transactional_db):
    """start(**env): a worker on this module's queue whose storage is the bucket; stopped at the test's end."""
    from django.db import connection

    with ExitStack() as workers:

        def start(**env: str) -> LiveWorker:
            log_path = tmp_path_factory.mktemp("s3-worker") / "worker.log"
            environment = worker_env(
                settings_dict=connection.settings_dict,
                broker=broker,
                media_root=media_root,
                COMPRESSOR_ALLOW_LOCAL_PATHS="True",  # the tiny model is a server folder, as an operator may allow
                **s3.env(scratch),
                **env,
            )
            return workers.enter_context(
                running_worker(prefix="test-s3", queues=[QUEUE], log_path=log_path, env=environment)
            )

        yield start
    from compressor_app.celery import app

    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge(QUEUE)


@pytest.fixture
def queue_tiny_job(make_job, tiny_model_dir):
    """queue_tiny_job(owner): an fp8-dynamic job (data-free) on the tiny model, sent to this module's queue."""
    from jobs.tasks import compress_job

    def queue(owner, **fields) -> Job:
        job = make_job(owner, model_source=str(tiny_model_dir), queue=QUEUE, device_class="cpu", **fields)
        compress_job.apply_async(args=(job.pk,), task_id=job.celery_task_id, queue=QUEUE)
        return job

    return queue


def _wait_status(job: Job, *statuses: str, timeout: float = 600) -> Job:
    def reached():
        job.refresh_from_db()
        return job.status in statuses

    wait_until(reached, timeout=timeout, what=f"job {job.pk} to become {' or '.join(statuses)}")
    return job


def _body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _published(job: Job, files: dict[str, bytes]) -> Job:
    """The job succeeded with these files as its checkpoint, uploaded as a worker uploads one (no engine)."""
    from engine.artifacts import write_manifest
    from jobs import artifact_store

    folder = artifact_store.work_folder(job)
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    manifest = write_manifest(folder)
    artifact_store.publish(job, folder, manifest)
    Job.objects.filter(pk=job.pk).update(status="succeeded", artifacts_path=job.artifacts_relpath(), manifest=manifest)
    job.refresh_from_db()
    return job


def test_a_checkpoint_written_through_s3_downloads_by_redirect_and_archive(
    s3_worker, on_s3, queue_tiny_job, user, scratch
):
    # Given a worker whose storage is the bucket
    worker = s3_worker()

    # When it runs a job
    job = _wait_status(queue_tiny_job(user), "succeeded", "failed")

    # Then the checkpoint is in the bucket, manifest included, and the worker's scratch copy is gone
    assert job.status == "succeeded", job.error + "\n" + worker.log_tail()
    expected = {entry["path"]: entry["sha256"] for entry in job.manifest["files"]}
    keys = on_s3.keys(f"jobs/{job.pk}/")
    assert keys == sorted(f"{job.artifacts_path}/{path}" for path in [*expected, "manifest.json"])
    assert not (scratch / "jobs" / str(job.pk)).exists()

    # ...one file is a redirect to a presigned URL whose bytes match the manifest, Range included
    web = Client()
    web.force_login(user)
    weights = next(path for path in expected if path.endswith(".safetensors"))
    redirect = web.get(f"/api/v1/jobs/{job.pk}/files/{weights}")
    assert redirect.status_code == 302
    fetched = requests.get(redirect["Location"], timeout=60)
    assert fetched.status_code == 200 and _sha(fetched.content) == expected[weights]
    assert f'filename="{weights}"' in fetched.headers["Content-Disposition"]
    ranged = requests.get(redirect["Location"], headers={"Range": "bytes=1000-1999"}, timeout=60)
    assert ranged.status_code == 206 and ranged.content == fetched.content[1000:2000]

    # ...the manifest and SHA256SUMS read the same as on local storage
    manifest = json.loads(_body(web.get(f"/api/v1/jobs/{job.pk}/manifest/")))
    assert {entry["path"]: entry["sha256"] for entry in manifest["files"]} == expected
    sums = web.get(f"/jobs/{job.pk}/SHA256SUMS").content.decode()
    assert sums == "".join(f"{sha}  {path}\n" for path, sha in expected.items())

    # ...and the streamed tar and zip archives hold every file with its manifest sha256
    tarred = web.get(f"/api/v1/jobs/{job.pk}/archive/", {"kind": "tar"})
    data = _body(tarred)
    assert tarred.status_code == 200 and int(tarred["Content-Length"]) == len(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        got = {m.name.split("/", 1)[1]: _sha(archive.extractfile(m).read()) for m in archive.getmembers()}
    assert {k: v for k, v in got.items() if k != "manifest.json"} == expected
    with zipfile.ZipFile(io.BytesIO(_body(web.get(f"/api/v1/jobs/{job.pk}/archive/")))) as archive:
        got = {name.split("/", 1)[1]: _sha(archive.read(name)) for name in archive.namelist()}
    assert {k: v for k, v in got.items() if k != "manifest.json"} == expected


def test_a_damaged_object_is_refused(on_s3, make_job, user, transactional_db):
    # Given a succeeded job whose checkpoint was uploaded as the worker uploads it
    job = _published(
        make_job(user), {"model.safetensors": os.urandom(200_000), "config.json": b'{"model_type": "llama"}'}
    )
    manifest = job.manifest
    web = Client()
    web.force_login(user)
    assert web.get(f"/api/v1/jobs/{job.pk}/files/model.safetensors").status_code == 302

    # When an object is replaced with other bytes (same size: only the recorded sha256 tells)
    key = f"{job.artifacts_relpath()}/model.safetensors"
    on_s3.client().put_object(Bucket=on_s3.bucket, Key=key, Body=os.urandom(200_000))

    # Then neither the file nor the archive is sent
    for url in ("files/model.safetensors", "archive/", "archive/?kind=tar"):
        response = web.get(f"/api/v1/jobs/{job.pk}/{url}")
        assert response.status_code == 409 and b"damaged" in response.content, (url, response.status_code)

    # ...and with the forged sha256 metadata as well, the streamed archive stops before its end
    on_s3.client().copy_object(
        Bucket=on_s3.bucket,
        Key=key,
        CopySource={"Bucket": on_s3.bucket, "Key": key},
        Metadata={"sha256": manifest["files"][1]["sha256"]},
        MetadataDirective="REPLACE",
    )
    assert manifest["files"][1]["path"] == "model.safetensors"
    response = web.get(f"/api/v1/jobs/{job.pk}/archive/", {"kind": "tar"})
    assert response.status_code == 200
    with pytest.raises(Exception, match="damaged"):
        _body(response)


def test_a_worker_killed_mid_upload_leaves_no_object_under_the_final_name(
    s3_worker, on_s3, queue_tiny_job, user, scratch
):
    # Given a worker whose uploads go multipart above 1 MiB, at 256 kB/s (the weights take about 25 s)
    worker = s3_worker(
        COMPRESSOR_S3_MULTIPART_THRESHOLD_BYTES=str(2**20),
        COMPRESSOR_S3_MULTIPART_CHUNK_BYTES=str(5 * 2**20),
        COMPRESSOR_S3_MAX_BANDWIDTH=str(256 * 1024),
    )
    job = queue_tiny_job(user)

    # When it is killed (SIGKILL, the whole worker) while a multipart upload is under way
    uploads = wait_until(
        lambda: on_s3.open_uploads(f"jobs/{job.pk}/"), timeout=600, what=f"job {job.pk}'s multipart upload to begin"
    )
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait(timeout=30)

    # Then the object being uploaded does not exist under its name, nor does the manifest
    keys = on_s3.keys(f"jobs/{job.pk}/")
    assert uploads[0]["Key"] not in keys and f"{job.artifacts_relpath()}/manifest.json" not in keys
    job.refresh_from_db()
    web = Client()
    web.force_login(user)
    assert web.get(f"/api/v1/jobs/{job.pk}/archive/").status_code == 409

    # ...and once the job has ended (here failed as the reaper would), housekeeping aborts the upload and
    # removes its objects and the scratch copy
    assert lifecycle.job_fail(job_id=job.pk, task_id=job.celery_task_id, error="Worker lost (test).")
    removed = retention.job_remove_stale_partials()
    assert f"upload of {uploads[0]['Key']}" in removed
    assert on_s3.open_uploads(f"jobs/{job.pk}/") == [] and on_s3.keys(f"jobs/{job.pk}/") == []
    assert not (scratch / "jobs" / str(job.pk)).exists()


def test_a_calibration_upload_is_stored_in_s3_and_used_by_a_job(
    s3_worker, on_s3, api, user, tiny_model_dir, media_root, scratch
):
    # Given a calibration file uploaded through the API
    rows = "".join(json.dumps({"text": f"Sample number {i} of the calibration text."}) + "\n" for i in range(16))
    upload = io.BytesIO(rows.encode())
    upload.name = "calib.jsonl"
    created = api.post("/api/v1/calibration-datasets/", {"name": "calib", "file": upload}, format="multipart")
    assert created.status_code == 201, created.content
    from jobs.models import CalibrationDataset

    dataset = CalibrationDataset.objects.get(pk=created.json()["id"])

    # Then it is an object in the bucket, not a file under MEDIA_ROOT
    assert dataset.file.name in on_s3.keys("calibration/") and not (Path(media_root) / dataset.file.name).exists()

    # When a job that calibrates on it runs on the bucket's worker
    worker = s3_worker()
    from jobs.tasks import compress_job

    job = Job.objects.create(
        owner=user,
        model_source=str(tiny_model_dir),
        preset="int8-w8a8-gptq",
        calibration_kind="upload",
        calibration_file=dataset,
        calibration_samples=8,
        calibration_max_seq_len=32,
        queue=QUEUE,
        device_class="cpu",
        celery_task_id=str(uuid.uuid4()),
    )
    compress_job.apply_async(args=(job.pk,), task_id=job.celery_task_id, queue=QUEUE)

    # Then it succeeds with the uploaded rows as its calibration data
    job = _wait_status(job, "succeeded", "failed")
    assert job.status == "succeeded", job.error + "\n" + worker.log_tail()
    assert f"{job.artifacts_relpath()}/manifest.json" in on_s3.keys(f"jobs/{job.pk}/")

    # ...and the local copies of the upload (the web side's, the worker's), once no job read them for a day,
    # are removed by housekeeping; the bucket keeps the upload, and the next read copies it again
    copies = list((scratch / "uploads").glob(f"{dataset.sha256}*"))
    assert copies
    a_day_ago = time.time() - 25 * 3600
    for copy in copies:
        os.utime(copy, (a_day_ago, a_day_ago))
    removed = retention.job_remove_stale_partials()
    assert all(copy in removed and not copy.exists() for copy in copies)
    assert dataset.file.name in on_s3.keys("calibration/")
    assert artifact_store.local_copy(dataset.file.name, sha256=dataset.sha256).read_text() == rows


def test_a_submission_naming_an_upload_in_the_bucket_copies_nothing_to_the_web_process(on_s3, api, scratch):
    # Given an upload stored in the bucket, its rows counted as it came in
    upload = io.BytesIO(b'{"text": "a row of calibration text"}\n' * 64)
    upload.name = "calib.jsonl"
    created = api.post("/api/v1/calibration-datasets/", {"name": "calib", "file": upload}, format="multipart")
    assert created.status_code == 201, created.content
    sha256 = created.json()["sha256"]

    # When a job names it
    calibration = {"kind": "upload", "dataset_id": created.json()["id"], "samples": 32}
    submitted = api.post("/api/v1/jobs/", {"preset": "int8-w8a8-gptq", "calibration": calibration}, format="json")

    # Then it is checked against the stored count: the web process fetched no copy of the file
    assert submitted.status_code == 201, submitted.content
    assert not list((scratch / "uploads").glob(f"{sha256}*"))


def test_orphans_in_the_bucket_are_found_and_removed(on_s3, make_job, user, transactional_db):
    # Given a succeeded job's checkpoint in the bucket
    kept = _published(make_job(user), {"model.safetensors": b"weights"})
    assert not retention.orphans_find()

    # When objects lose their rows (a deleted job's, a failed job's checkpoint) and a row its objects
    put = on_s3.client().put_object
    put(Bucket=on_s3.bucket, Key="jobs/999999/checkpoint/model.safetensors", Body=b"x")
    failed = make_job(user, status=Job.Status.FAILED)
    put(Bucket=on_s3.bucket, Key=f"jobs/{failed.pk}/checkpoint/config.json", Body=b"{}")
    gone = make_job(user, status=Job.Status.SUCCEEDED, artifacts_path=f"jobs/{failed.pk + 1000}/checkpoint")

    # Then each is named, and removing them keeps the published checkpoint
    orphans = retention.orphans_find()
    assert sorted(orphans.files_without_rows) == sorted(["jobs/999999", f"jobs/{failed.pk}/checkpoint"])
    assert orphans.rows_without_files == [f"job {gone.pk}: {gone.artifacts_path}"]
    retention.orphans_remove(orphans)
    assert on_s3.keys("jobs/999999/") == [] and on_s3.keys(f"jobs/{failed.pk}/") == []
    assert f"{kept.artifacts_relpath()}/model.safetensors" in on_s3.keys(f"jobs/{kept.pk}/")
