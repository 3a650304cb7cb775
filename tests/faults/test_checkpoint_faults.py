"""The checkpoint on disk: a kill in the middle of writing it, and a byte flipped after it was stored."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from engine.artifacts import verify_manifest
from jobs.services import retention
from tests.faults.conftest import leftovers
from tests.faults.test_worker_faults import _kill_child, _wait_running, _wait_status

BUILTIN = "smollm2-135m-instruct"


def _body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


@pytest.mark.slow
def test_a_kill_during_the_save_leaves_no_checkpoint_and_a_retry_makes_a_complete_one(
    fault_worker, owner, queue_job, media_root, api_for, builtin_model
):
    # Given a job on its last attempt (re-queued once already), writing its checkpoint
    job = queue_job(owner, model_source=BUILTIN, requeue_count=1)
    _wait_running(job, fault_worker, stage="saving")

    # When its process is SIGKILLed in the middle of the save
    _kill_child(fault_worker)

    # Then the job fails ("worker lost"); no final folder appears, only the temporary one is left
    failed = _wait_status(job, "failed", "succeeded", timeout=60)
    assert failed.status == "failed" and "Worker lost" in failed.error, failed.error
    left = leftovers(media_root, job)
    assert "checkpoint" not in left and any(".partial-" in name for name in left), left

    # ...no download is offered
    api = api_for(owner)
    for url in ("archive/", "manifest/", "files/model.safetensors"):
        response = api.get(f"/api/v1/jobs/{job.pk}/{url}")
        assert response.status_code in (404, 409), (url, response.status_code)

    # ...housekeeping removes the stale temporary folder
    removed = retention.job_remove_stale_partials()
    assert leftovers(media_root, job) == [] and [p.name for p in removed] == left

    # ...and a retry produces a complete checkpoint
    retry = _wait_status(queue_job(owner, model_source=BUILTIN), "succeeded", "failed")
    assert retry.status == "succeeded", retry.error
    assert verify_manifest(Path(media_root) / retry.artifacts_path) == []


def test_a_flipped_byte_is_refused_and_a_clean_download_passes_sha256sum(
    owner, make_job, checkpoint, api_for, tmp_path
):
    api = api_for(owner)

    # Given a stored checkpoint: downloaded file by file, it passes `sha256sum -c` against its manifest
    job = make_job(owner)
    folder = checkpoint(job)
    manifest = json.loads(_body(api.get(f"/api/v1/jobs/{job.pk}/manifest/")))
    for entry in manifest["files"]:
        response = api.get(f"/api/v1/jobs/{job.pk}/files/{entry['path']}")
        assert response.status_code == 200
        (tmp_path / entry["path"]).write_bytes(_body(response))
    sums = "".join(f"{entry['sha256']}  {entry['path']}\n" for entry in manifest["files"])
    (tmp_path / "SHA256SUMS").write_text(sums)
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    # When one byte of its weights shard flips on disk
    shard = folder / "model.safetensors"
    with shard.open("r+b") as handle:
        handle.seek(1234)
        byte = handle.read(1)
        handle.seek(1234)
        handle.write(bytes([byte[0] ^ 0x01]))

    # Then the integrity check names the shard, and neither the file nor the archive is sent
    assert verify_manifest(folder) == ["model.safetensors"]
    refused = api.get(f"/api/v1/jobs/{job.pk}/files/model.safetensors")
    assert refused.status_code == 409 and "damaged" in refused.json()["detail"], refused.content
    assert api.get(f"/api/v1/jobs/{job.pk}/files/model.safetensors", HTTP_RANGE="bytes=0-99").status_code == 409
    assert api.get(f"/api/v1/jobs/{job.pk}/archive/").status_code == 409
    # ...while its intact files still download
    assert api.get(f"/api/v1/jobs/{job.pk}/files/config.json").status_code == 200
