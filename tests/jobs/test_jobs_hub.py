"""A hub model end to end through the local hub (tests/hub_server.py): the API records it in well under a
second with its commit pinned, and a real worker downloads that commit with byte progress and compresses it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from jobs.inputs import job_spec
from jobs.models import Job
from tests.hub_server import folder_blobs, llama_1b_files

FP8 = {"preset": "fp8-dynamic", "calibration": {"kind": "none"}, "force": True}


def _results_json(media_root, job: Job) -> dict:
    """The results.json written beside the checkpoint: what ran (model, revision, parameters)."""
    return json.loads((Path(media_root) / job.artifacts_path / "results.json").read_text())


def _submit(api, model: str, **extra):
    started = time.perf_counter()
    response = api.post("/api/v1/jobs/", {**FP8, "model": model, **extra}, format="json")
    return response, time.perf_counter() - started


@pytest.mark.django_db
def test_a_1b_hub_model_is_recorded_in_under_a_second_with_its_commit_pinned(api, hub, hub_repo_id):
    # Given a Llama-3.2-1B-shaped model (2.5 GB of weights) on the hub, and a warm web process
    repo_id = hub_repo_id("llama-1b")
    repo = hub.add_repo(repo_id, llama_1b_files())
    _submit(api, hub_repo_id("warm-up"))  # a refused one: the first request imports what any request needs

    # When it is submitted through the API with a grouped preset
    response, elapsed = _submit(api, repo_id, preset="w4a16-gptq", calibration={"kind": "builtin"})

    # Then it is queued at once, pinned to the commit main named, with the header's facts on the record
    assert response.status_code == 201, response.content
    assert elapsed < 1.0, f"the submission took {elapsed:.2f} s"
    job = Job.objects.get(pk=response.json()["id"])
    assert job.status == "queued" and job.model_commit == repo.branches["main"]
    assert response.json()["model_commit"] == job.model_commit and response.json()["revision"] == ""
    assert job.model_facts["num_parameters"] == 1_235_814_400 and job.model_facts["dtypes"] == {"BF16": 1_235_814_400}
    assert job_spec(job).revision == job.model_commit and job_spec(job).resolved_recipe == job.resolved_recipe


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("kind", "words"), [("gated", "is a gated model on the hub"), ("missing", "was not found on the hub")]
)
def test_a_gated_or_missing_hub_model_gets_a_400_naming_the_model(api, hub, hub_repo_id, kind, words):
    repo_id = hub_repo_id(kind)
    if kind == "gated":
        hub.add_repo(repo_id, llama_1b_files(), gated=True)

    response, _elapsed = _submit(api, repo_id)

    assert response.status_code == 400, response.content
    assert words in response.json()["model"][0] and repo_id in response.json()["model"][0]
    assert not Job.objects.exists()


@pytest.mark.slow
def test_the_worker_downloads_the_hub_model_with_byte_progress_and_compresses_it(
    live_worker, api, hub, hub_repo_id, builtin_model, wait_job, media_root
):
    # Given the built-in model (270 MB) as a hub repository
    repo_id = hub_repo_id("smol")
    repo = hub.add_folder(repo_id, builtin_model)
    total = sum(blob.size for blob in repo.commits[repo.branches["main"]].values())

    # When it is submitted and the worker runs it
    response, _elapsed = _submit(api, repo_id)
    assert response.status_code == 201, response.content
    job = wait_job(response.json()["id"], "succeeded", "failed")

    # Then it succeeded on that commit
    assert job.status == "succeeded", job.error + "\n" + live_worker.log_tail()
    ran = _results_json(media_root, job)
    assert ran["revision"] == repo.branches["main"] and ran["model"] == repo_id
    # ...and the log shows the preparing stage counting the bytes up to the whole model
    lines = [line.text for line in job.log_lines.filter(stage="preparing")]
    counts = [tuple(int(n.replace(",", "")) for n in m.groups()) for m in map(_BYTES.search, lines) if m]
    assert len(counts) >= 3, lines
    assert counts[-1] == (total, total) and all(of == total for _done, of in counts)
    assert [done for done, _of in counts] == sorted(done for done, _of in counts)


@pytest.mark.slow
def test_a_revision_moved_after_submission_still_runs_the_pinned_commit(
    live_worker, api, hub, hub_repo_id, tiny_model_dir, builtin_model, wait_job, media_root
):
    # Given a tiny model on the hub, submitted while the worker takes no jobs
    repo_id = hub_repo_id("moving")
    repo = hub.add_folder(repo_id, tiny_model_dir)
    pinned = repo.branches["main"]
    live_worker.pause()
    response, _elapsed = _submit(api, repo_id, revision="main")
    assert response.status_code == 201, response.content

    # When main moves to another model (the built-in one) before the job runs
    moved = repo.commit(folder_blobs(builtin_model))
    live_worker.resume()
    job = wait_job(response.json()["id"], "succeeded", "failed")

    # Then the job ran the commit seen at submission: the tiny model, not what main names now
    assert job.status == "succeeded", job.error + "\n" + live_worker.log_tail()
    ran = _results_json(media_root, job)
    assert moved != pinned and ran["revision"] == pinned
    assert ran["num_parameters"] < 10_000_000, ran["num_parameters"]  # the built-in model has 134 M


_BYTES = re.compile(r"Downloading bytes ([\d,]+) of ([\d,]+)")
