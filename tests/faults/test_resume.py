"""Resume after a worker death, for real: a GPTQ job on the built-in model (30 decoder layers) whose worker
child is SIGKILLed after N layers is re-queued as attempt 2, which restores those layers instead of
calibrating and compressing them again, ends with a verified checkpoint, and leaves no resume folder.
"""

from __future__ import annotations

import json
import os
import re
import signal

import pytest

from engine.artifacts import verify_manifest
from engine.layer_resume import INDEX_NAME
from jobs.models import Job
from tests.faults.conftest import BUILTIN, GPTQ, job_dir
from tests.faults.test_worker_faults import _wait_status
from tests.support import wait_until

pytestmark = pytest.mark.slow

KILL_AFTER = 5  # layers 0-4 are compressed (and stored) once layer 6 of 30 is reported


def _wait_for_layer(job, number: int) -> Job:
    """Until the job reports "Layer <number> of N" (calibrating); fails early if it ended instead."""

    def reached():
        current = Job.objects.get(pk=job.pk)
        if current.is_terminal:
            raise AssertionError(f"job {job.pk} ended ({current.status}: {current.error}) before layer {number}")
        return current.stage == "calibrating" and (current.step or 0) >= number and current

    return wait_until(reached, timeout=600, interval=0.05, what=f"job {job.pk} to report layer {number}")


def test_a_gptq_job_killed_after_n_layers_resumes_from_them_in_attempt_2(fault_worker, owner, queue_job, media_root):
    # Given a GPTQ job on the built-in model that has reported layer 6 of 30 (layers 0-4 are done)
    job = queue_job(owner, model_source=BUILTIN, **GPTQ)
    running = _wait_for_layer(job, KILL_AFTER + 1)
    total = running.total

    # When its worker child is SIGKILLed
    os.kill(fault_worker.child_pid(), signal.SIGKILL)

    # Then the layers it had finished are in the job's resume folder, named by an index it wrote atomically
    resume_dir = job_dir(media_root, job) / "resume"
    index = json.loads((resume_dir / INDEX_NAME).read_text())
    assert index["total"] == total == 30 and index["done"][:KILL_AFTER] == list(range(KILL_AFTER))
    resumed_at = len(index["done"])
    assert index["done"] == list(range(resumed_at)) and resumed_at < total

    # ...attempt 2 (re-queued by the worker's main process) says where it resumes and ends with a checkpoint
    # (30 layers of GPTQ take about a minute on two idle cores, and 20 when five other test runs share them)
    done = _wait_status(job, "succeeded", "failed", timeout=1800)
    assert done.status == "succeeded" and done.requeue_count == 1, done.error
    log = list(done.log_lines.values_list("text", flat=True))
    attempt_2 = log[next(i for i, line in enumerate(log) if line.startswith("Re-queued for attempt 2")) :]
    resuming = (
        f"Resuming from layer {resumed_at} of {total} (layers 0–{resumed_at - 1} restored from the interrupted run)"
    )
    assert resuming in attempt_2, "\n".join(attempt_2[:40])
    # ...without calibrating or compressing the restored layers again
    quantized = {
        int(n) for line in attempt_2 for n in re.findall(r"'model\.layers\.(\d+)\.", line) if "Quantizing" in line
    }
    assert quantized == set(range(resumed_at, total))
    # ...with every layer in its results (the restored ones' errors as attempt 1 measured them)
    layers_with_errors = {int(entry["module"].split(".")[2]) for entry in done.results["layer_errors"]}
    assert layers_with_errors == set(range(total))
    folder = job_dir(media_root, job)
    assert verify_manifest(folder / "checkpoint") == []
    assert "quantization_config" in json.loads((folder / "checkpoint" / "config.json").read_text())
    # ...and the resume folder is gone with the job's success
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint"]
