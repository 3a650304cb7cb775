"""Running out of resources for real: memory (an address-space limit on the worker child), disk (a small
tmpfs mounted where checkpoints go) and, over many jobs, the worker's own memory (a soak)."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest

from engine.artifacts import verify_manifest
from tests.faults.conftest import BUILTIN, STATIC_FP8, leftovers
from tests.faults.test_worker_faults import _wait_running, _wait_status
from tests.support import wait_until

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


def test_out_of_memory_in_the_engine_fails_the_job_in_plain_words_and_the_worker_goes_on(
    fault_worker, owner, queue_job, media_root, builtin_model
):
    # Given a warm worker child whose address space is then capped 200 MiB above what it holds now
    assert _wait_status(queue_job(owner), "succeeded", "failed").status == "succeeded"
    child = fault_worker.child_pid()
    cap = psutil.Process(child).memory_info().vms + 200 * MiB
    resource.prlimit(child, resource.RLIMIT_AS, (cap, cap))

    # When it runs a job whose model needs more (the built-in model: 270 MB of weights)
    job = _wait_status(queue_job(owner, model_source=BUILTIN), "failed", "succeeded")

    # Then the job fails with a message that says so and what to try, and leaves no output
    assert job.status == "failed" and "ran out of memory" in job.error and "Try fewer" in job.error, job.error
    assert leftovers(media_root, job) == []
    # ...and the worker takes the next job (in a new child, without the cap)
    nxt = _wait_status(queue_job(owner), "succeeded", "failed")
    assert nxt.status == "succeeded" and nxt.worker == fault_worker.name, nxt.error
    assert child not in fault_worker.child_pids()


@pytest.fixture
def small_disk(media_root):
    """A 400 MiB tmpfs mounted where the jobs' folders live (unmounted afterwards)."""
    jobs_root = Path(media_root) / "jobs"
    jobs_root.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(jobs_root)], check=True)
    try:
        yield jobs_root
    finally:
        subprocess.run(["umount", "-l", str(jobs_root)], check=True)


def _fill(folder: Path, leave_bytes: int) -> Path:
    filler = folder / "filler.bin"
    size = shutil.disk_usage(folder).free - leave_bytes
    with filler.open("wb") as handle:
        handle.truncate(0)
        chunk = b"\0" * MiB
        for _ in range(max(0, size) // MiB):
            handle.write(chunk)
    return filler


def test_a_full_disk_fails_the_job_cleanly_and_a_job_that_cannot_fit_is_refused(
    fault_worker, owner, queue_job, make_job, checkpoint, api_for, small_disk, builtin_model
):
    # Given an earlier checkpoint on that disk
    earlier = make_job(owner)
    earlier_folder = checkpoint(earlier)

    # When the disk fills up while a job (static FP8 on the built-in model) is calibrating, before it writes
    job = queue_job(owner, model_source=BUILTIN, **STATIC_FP8)
    _wait_running(job, fault_worker, stage="calibrating")
    filler = _fill(small_disk, leave_bytes=8 * MiB)

    # Then the job fails with "no space left", its temporary files are removed (but the layers it compressed,
    # which a retry of the failed job resumes from: jobs.resume_folders), the earlier checkpoint is intact and downloads
    failed = _wait_status(job, "failed", "succeeded")
    assert failed.status == "failed" and "No space left on device" in failed.error, failed.error
    assert leftovers(small_disk.parent, job) in ([], ["resume"])
    assert verify_manifest(earlier_folder) == []
    assert api_for(owner).get(f"/api/v1/jobs/{earlier.pk}/archive/").status_code == 200

    # When only 200 MiB are free and a job would need more, it is refused before it writes anything
    filler.unlink()
    _fill(small_disk, leave_bytes=200 * MiB)
    refused = _wait_status(queue_job(owner, model_source=BUILTIN), "failed", "succeeded")
    assert refused.status == "failed" and "Not enough free disk space" in refused.error, refused.error
    assert leftovers(small_disk.parent, refused) == []


SOAK_JOBS = 30


def test_soak_idle_worker_memory_stays_flat_over_many_jobs(fault_worker, owner, queue_job, tiny_model_dir):
    def rss_mib() -> float:
        processes = [psutil.Process(fault_worker.process.pid), *psutil.Process(fault_worker.process.pid).children()]
        return sum(p.memory_info().rss for p in processes) / MiB

    def idle_rss_mib() -> float:
        wait_until(lambda: not fault_worker.active(), timeout=60, what="the worker to be idle")
        # Idle once its memory stops moving: two readings a quarter second apart within 1 MiB
        readings = [rss_mib()]

        def settled() -> float | None:
            readings.append(rss_mib())
            return readings[-1] if abs(readings[-1] - readings[-2]) < 1 else None

        return wait_until(settled, timeout=60, what="the idle worker's memory to settle")

    # Given one job done on the worker (its child warm)
    assert _wait_status(queue_job(owner), "succeeded", "failed").status == "succeeded"
    child = fault_worker.child_pid()
    after_first = idle_rss_mib()

    # When 29 more run back to back
    jobs = [queue_job(owner) for _ in range(SOAK_JOBS - 1)]
    assert all(_wait_status(job, "succeeded", "failed", timeout=300).status == "succeeded" for job in jobs)
    after_last = idle_rss_mib()

    # Then the worker's idle memory (main process + child) is within 10 % of what it was after the first
    figures = json.dumps({"after_first_mib": round(after_first), "after_last_mib": round(after_last)})
    print(f"soak: {SOAK_JOBS} jobs, idle RSS {figures}")
    assert fault_worker.child_pid() == child, "the same warm child ran them all"
    assert after_last <= after_first * 1.10, figures
