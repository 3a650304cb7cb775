"""Two jobs on one hub model at once, on two real Celery workers that share the node's model cache
(engine.model_cache, COMPRESSOR_MODEL_CACHE_DIR from the session's hub environment): the local hub serves each
file once, the second job waits for the first one's download and uses it, and both succeed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from engine.model_cache import model_name
from jobs.models import Job
from tests.hub_server import Blob, folder_blobs
from tests.support import QUEUES, LiveWorker, running_worker, worker_env

FP8 = {"preset": "fp8-dynamic", "calibration": {"kind": "none"}, "force": True}


@pytest.fixture
def second_worker(live_worker, broker, media_root, hub_server, tmp_path) -> Iterator[LiveWorker]:
    """Another worker on the session's queues beside the session's own, with the same environment (so the same
    model cache folder); it ends with the test."""
    from django.db import connection

    log_path = tmp_path / "second-worker.log"
    env = worker_env(settings_dict=connection.settings_dict, broker=broker, media_root=media_root, **hub_server.env)
    with running_worker(prefix="test-second", queues=QUEUES, log_path=log_path, env=env) as worker:
        yield worker


def slowed(blob: Blob, fast: threading.Event) -> Blob:
    """The same file, served a megabyte (the server's chunk) a second until `fast` is set: slow enough that a
    second job asks while the first downloads (270 MB: 4 1/2 minutes), never so slow that a client's read times
    out (huggingface_hub's 10 s)."""

    def read(start: int, end: int) -> bytes:
        if not fast.is_set():
            time.sleep(1.0)
        return blob.read(start, end)

    return Blob(blob.size, read, blob.etag)


def log_of(job_id: int) -> list[str]:
    return [line.text for line in Job.objects.get(pk=job_id).log_lines.filter(stage="preparing")]


@pytest.mark.slow
def test_two_jobs_on_one_hub_model_at_once_download_it_once(
    live_worker, second_worker, api, hub, hub_repo_id, builtin_model, wait_for, wait_job
):
    # Given the built-in model (270 MB) as a hub repository, and two jobs on it queued while no worker takes jobs
    fast = threading.Event()
    fast.set()
    repo_id = hub_repo_id("shared")
    files = folder_blobs(builtin_model)
    repo = hub.add_repo(repo_id, {name: slowed(blob, fast) for name, blob in files.items()})
    commit = repo.branches["main"]
    for worker in (live_worker, second_worker):
        worker.pause()
    responses = [api.post("/api/v1/jobs/", {**FP8, "model": repo_id}, format="json") for _ in range(2)]
    assert [r.status_code for r in responses] == [201, 201], [r.content for r in responses]
    first_id, second_id = (r.json()["id"] for r in responses)
    served_before = len(hub.requests)  # the submissions read the metadata; from here on, only the workers ask

    # When both workers take one job each while the hub serves slowly
    fast.clear()
    for worker in (live_worker, second_worker):
        worker.resume()
    waiting = f"Waiting for another job's download of {model_name(repo_id, commit)}"

    def one_waits_for_the_others_download() -> tuple[int, int] | None:
        logs = {job_id: log_of(job_id) for job_id in (first_id, second_id)}
        waiter = next((job_id for job_id, lines in logs.items() if waiting in lines), None)
        return (waiter, ({first_id, second_id} - {waiter}).pop()) if waiter else None

    waiter, downloader = wait_for(one_waits_for_the_others_download, timeout=300, what="a job to wait for the other")
    fast.set()
    jobs = {job_id: wait_job(job_id, "succeeded", "failed") for job_id in (downloader, waiter)}

    # Then both succeeded on the pinned commit
    for job in jobs.values():
        assert job.status == "succeeded", job.error + "\n" + live_worker.log_tail() + "\n" + second_worker.log_tail()
        assert job.model_commit == commit
    # ...the hub served the weights once and no file twice (a small file the submission fetched into the hub
    # cache is copied from there): one download, by one job
    files_at = f"/{repo_id}/resolve/{commit}/"
    fetched = Counter(path for method, path in hub.requests[served_before:] if method == "GET" and files_at in path)
    assert {name: fetched[files_at + name] for name in files if name.endswith(".safetensors")} == {
        "model.safetensors": 1
    }
    assert set(fetched.values()) == {1}, fetched
    downloaded, reused = log_of(downloader), log_of(waiter)
    assert f"Downloading {model_name(repo_id, commit)} into this node's model cache" in downloaded
    assert any(line.startswith("Downloading bytes") for line in downloaded)
    # ...and the other job waited for that download, then used the cached model without fetching a byte
    assert f"Using the cached model {model_name(repo_id, commit)}, which another job downloaded meanwhile" in reused
    assert not any(line.startswith("Downloading") for line in reused), reused
