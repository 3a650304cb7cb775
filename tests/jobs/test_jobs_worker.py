"""Integration: the REST API, a real Redis, a real `celery worker` process and the real engine on the
built-in model. No eager mode and no mocks: this is where such services break.

Runs on the database the session uses (SQLite by default; test_jobs_postgres.py reruns the core of it
on PostgreSQL).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from jobs.models import CalibrationDataset, Job

pytestmark = pytest.mark.slow

FP8 = {"preset": "fp8-dynamic", "calibration": {"kind": "none"}}
GPTQ_SMALL = {"preset": "int8-w8a8-gptq", "calibration": {"kind": "builtin", "samples": 8, "max_seq_len": 128}}


def _create(api, body: dict, expected: int = 201) -> dict:
    response = api.post("/api/v1/jobs/", body, format="json")
    assert response.status_code == expected, response.content
    return response.json()


def _body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def test_a_job_runs_to_success_and_its_archive_matches_the_manifest(live_worker, api, wait_job, media_root):
    # Given a job submitted through the API
    created = _create(api, {**FP8, "force": True})
    assert created["status"] == "queued" and created["queue_position"] in (1, None)

    # When the worker runs it
    job = wait_job(created["id"], "succeeded", "failed")

    # Then it succeeded, with results, progress at 100 % and a log
    assert job.status == "succeeded", job.error + "\n" + live_worker.log_tail()
    detail = api.get(f"/api/v1/jobs/{job.pk}/").json()
    assert detail["percent"] == 100.0 and detail["results"]["size_after_bytes"] < detail["results"]["size_before_bytes"]
    logs = api.get(f"/api/v1/jobs/{job.pk}/logs/").json()
    assert any("Started on" in line["text"] for line in logs["lines"])
    assert api.get(f"/api/v1/jobs/{job.pk}/logs/", {"after": logs["cursor"]}).json()["lines"] == []

    # ...the manifest lists the checkpoint files
    manifest = json.loads(_body(api.get(f"/api/v1/jobs/{job.pk}/manifest/")))
    names = {entry["path"] for entry in manifest["files"]}
    assert {"config.json", "recipe.yaml", "results.json"} <= names and any(n.endswith(".safetensors") for n in names)
    expected = {entry["path"]: entry["sha256"] for entry in manifest["files"]}

    # ...and every file in the streamed zip and tar archives has the manifest's sha256
    zipped = api.get(f"/api/v1/jobs/{job.pk}/archive/")
    assert zipped.status_code == 200 and zipped["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(_body(zipped))) as archive:
        got = {
            Path(*Path(n).parts[1:]).as_posix(): hashlib.sha256(archive.read(n)).hexdigest() for n in archive.namelist()
        }
    assert {k: v for k, v in got.items() if k != "manifest.json"} == expected
    tarred = api.get(f"/api/v1/jobs/{job.pk}/archive/", {"kind": "tar"})
    data = _body(tarred)
    assert int(tarred["Content-Length"]) == len(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        got = {
            Path(*Path(m.name).parts[1:]).as_posix(): hashlib.sha256(archive.extractfile(m).read()).hexdigest()
            for m in archive.getmembers()
        }
    assert {k: v for k, v in got.items() if k != "manifest.json"} == expected

    # ...and a Range request on the weights returns 206 with exactly those bytes
    weights = next(n for n in names if n.endswith(".safetensors"))
    on_disk = (Path(media_root) / job.artifacts_path / weights).read_bytes()
    partial = api.get(f"/api/v1/jobs/{job.pk}/files/{weights}", HTTP_RANGE="bytes=1000-1999")
    assert partial.status_code == 206 and partial["Content-Range"] == f"bytes 1000-1999/{len(on_disk)}"
    assert _body(partial) == on_disk[1000:2000]

    # ...and the same request again is answered with the earlier job instead of new work
    again = _create(api, FP8, expected=200)
    assert again["id"] == job.pk and again["duplicate"] is True


def test_a_refusal_only_the_worker_can_make_fails_the_job_in_the_same_words(live_worker, api, wait_job):
    # Given a custom recipe whose modifier and arguments exist, of the right types, but whose config group's
    # weight type only llm-compressor can judge (importing it imports torch, which the web process never does)
    recipe = (
        "quant_stage:\n  quant_modifiers:\n    QuantizationModifier: {targets: [Linear], config_groups: "
        "{group_0: {targets: [Linear], weights: {num_bits: 8, type: nosuchtype}}}}\n"
    )
    created = _create(api, {"recipe_yaml": recipe, "calibration": {"kind": "none"}})

    # When the worker prepares it
    failed = wait_job(created["id"], "failed", "succeeded")

    # Then the job failed in its preparing stage with llm-compressor's reason, as a 400 would have said it
    assert failed.status == "failed" and failed.stage == "preparing", (failed.status, failed.stage, failed.error)
    assert "llm-compressor rejected the recipe" in failed.error and "not a valid QuantizationType" in failed.error


def test_a_failed_job_is_retried_as_a_new_linked_job(live_worker, api, wait_job, media_root):
    # Given an uploaded calibration file and a GPTQ job using it, whose file vanishes before it runs
    upload = io.BytesIO(
        b"".join(b'{"text": "The quick brown fox jumps over the lazy dog. %d"}\n' % i for i in range(20))
    )
    upload.name = "cal.jsonl"
    dataset = api.post("/api/v1/calibration-datasets/", {"file": upload, "name": "fox"}, format="multipart").json()
    live_worker.pause()
    created = _create(
        api, {**GPTQ_SMALL, "calibration": {**GPTQ_SMALL["calibration"], "kind": "upload", "dataset_id": dataset["id"]}}
    )
    # this upload's own file (earlier tests of the session leave uploads of their own in the media folder)
    stored = Path(media_root) / CalibrationDataset.objects.get(pk=dataset["id"]).file.name
    content = stored.read_bytes()
    stored.unlink()

    # When the worker runs it, it fails with the reason in plain words
    live_worker.resume()
    failed = wait_job(created["id"], "failed", "succeeded")
    assert failed.status == "failed" and "does not exist" in failed.error, failed.error

    # When the file is back and the job is retried
    stored.write_bytes(content)
    response = api.post(f"/api/v1/jobs/{failed.pk}/retry/")
    assert response.status_code == 201, response.content
    retry = response.json()

    # Then a new job, linked to the failed one, runs the GPTQ recipe to success
    assert retry["id"] != failed.pk and retry["retry_of"] == failed.pk and retry["attempt"] == 2
    done = wait_job(retry["id"], "succeeded", "failed", timeout=1800)  # GPTQ took 15 min at load 8 on 2 cores
    assert done.status == "succeeded", done.error
    modules = [entry["module"] for entry in done.results["layer_errors"]]  # GPTQ's error per module, by name
    assert len(modules) == 210 and "model.layers.29.mlp.down_proj" in modules, modules[:3]


def test_a_cancelled_queued_job_never_starts(live_worker, api, wait_job):
    # Given a queued job (the worker is not taking jobs yet)
    live_worker.pause()
    queued = _create(api, {**FP8, "force": True})

    # When it is cancelled and the worker takes jobs again
    response = api.post(f"/api/v1/jobs/{queued['id']}/cancel/")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    live_worker.resume()
    later = _create(api, {**FP8, "force": True})
    wait_job(later["id"], "succeeded", "failed")

    # Then it never started, and stays cancelled
    job = Job.objects.get(pk=queued["id"])
    assert job.status == "cancelled" and job.started_at is None and job.worker == ""
    assert api.post(f"/api/v1/jobs/{job.pk}/cancel/").status_code == 409


def test_a_running_job_is_stopped_and_its_partial_output_removed(live_worker, api, wait_job, wait_for, media_root):
    # Given a GPTQ job in the middle of calibration
    created = _create(
        api, {"preset": "int8-w8a8-gptq", "calibration": {"kind": "builtin", "samples": 32, "max_seq_len": 256}}
    )
    wait_for(
        lambda: (
            Job.objects.filter(pk=created["id"], stage="calibrating", step__gte=2).exists()
            or Job.objects.filter(pk=created["id"], status__in=Job.TERMINAL).exists()
        ),
        timeout=600,
        what="calibration to reach layer 2",
    )

    # When it is cancelled
    response = api.post(f"/api/v1/jobs/{created['id']}/cancel/")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"

    # Then the worker stops it within seconds, leaves no output behind, and is free for the next job
    task_id = Job.objects.get(pk=created["id"]).celery_task_id
    wait_for(lambda: task_id not in {t["id"] for t in live_worker.active()}, timeout=120, what="the task to stop")
    job = Job.objects.get(pk=created["id"])
    assert job.status == "cancelled" and job.results is None
    assert not (Path(media_root) / "jobs" / str(job.pk)).exists() or not any(
        (Path(media_root) / "jobs" / str(job.pk)).iterdir()
    )
    nxt = _create(api, {**FP8, "force": True})
    assert wait_job(nxt["id"], "succeeded", "failed").status == "succeeded"


def test_priorities_order_the_queue(live_worker, api_for, make_user, wait_job):
    # Given three queued jobs with low, high and normal priority (the worker is not taking jobs)
    staff = api_for(make_user("operator", is_staff=True))
    live_worker.pause()
    low = _create(staff, {**FP8, "force": True, "priority": 1})
    high = _create(staff, {**FP8, "force": True, "priority": 9})
    normal = _create(staff, {**FP8, "force": True, "priority": 5})
    positions = {j["id"]: staff.get(f"/api/v1/jobs/{j['id']}/").json()["queue_position"] for j in (low, high, normal)}
    assert positions == {high["id"]: 1, normal["id"]: 2, low["id"]: 3}

    # When the worker takes jobs again
    live_worker.resume()
    jobs = [wait_job(j["id"], "succeeded", "failed") for j in (low, high, normal)]

    # Then it started them highest priority first
    started = sorted(jobs, key=lambda j: j.started_at)
    assert [j.pk for j in started] == [high["id"], normal["id"], low["id"]]
