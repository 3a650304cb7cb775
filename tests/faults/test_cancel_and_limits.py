"""Cancel at each stage of a running job, and the soft and hard time limits, on a real worker.

Bound for a cancel (asserted): the job is marked cancelled at once; its run stops at the engine's next
check, which comes at the end of the current step: the model load (preparing), one decoder layer
(calibrating), the write of the checkpoint (saving) or one evaluation part (evaluating). A step that
takes longer than COMPRESSOR_CANCEL_GRACE_S (30 s by default, 5 s here) is cut short: the light worker
terminates the run's process. So a cancelled run stops within the grace plus a few seconds
(CANCEL_BOUND_S here, on a loaded two-core machine); afterwards the worker child that ran it has been
replaced and no temporary output is left.
"""

from __future__ import annotations

import time

import pytest

from jobs.models import Job
from jobs.services import broker, lifecycle, recovery, retention
from tests.faults.conftest import BUILTIN, GPTQ, freeze, leftovers
from tests.faults.test_worker_faults import _wait_running, _wait_status
from tests.hub_server import llama_1b_files
from tests.support import wait_until

pytestmark = pytest.mark.slow

CANCEL_BOUND_S = 60
HUB_1B = "test-org/llama-1b-to-cancel"  # served by the local hub: 2.5 GB to download, so preparing lasts
STAGE_JOBS = {
    "preparing": {"model_source": HUB_1B},
    "loading": {"model_source": BUILTIN},
    "calibrating": {"model_source": BUILTIN, **GPTQ},
    "saving": {"model_source": BUILTIN},
    "evaluating": {"evaluation": {"offline": True, "limit": 4}},  # the tiny model
}


@pytest.mark.parametrize("stage", list(STAGE_JOBS))
def test_a_job_cancelled_in_each_stage_stops_and_leaves_nothing(
    stage, fault_worker, light_worker, owner, queue_job, media_root, builtin_model, settings, hub
):
    settings.COMPRESSOR_CANCEL_GRACE_S = 5
    if HUB_1B not in hub.repos:
        hub.add_repo(HUB_1B, llama_1b_files())
    # Given a job running in that stage
    job = queue_job(owner, **STAGE_JOBS[stage])
    _wait_running(job, fault_worker, stage=stage)
    child = fault_worker.child_pid()

    # When its owner cancels it
    started = time.monotonic()
    cancelled = lifecycle.job_cancel(job=job, by=owner)
    assert cancelled.status == "cancelled"

    # Then its run stops within the bound, the child that ran it is replaced, and no output is left
    wait_until(lambda: not fault_worker.active(), timeout=CANCEL_BOUND_S, what=f"the run cancelled in {stage} to stop")
    elapsed = time.monotonic() - started
    wait_until(
        lambda: child not in fault_worker.child_pids() and fault_worker.child_pids(),
        timeout=30,
        what="the worker child that ran the cancelled job to be replaced",
    )
    job.refresh_from_db()
    assert job.status == "cancelled" and job.results is None and not job.artifacts_path
    assert leftovers(media_root, job) == [], f"output left after a cancel in {stage}"
    assert elapsed < CANCEL_BOUND_S


def test_a_job_cancelled_while_queued_stays_cancelled_across_worker_restarts(
    start_worker, owner, queue_job, transactional_db
):
    # Given a queued job whose message waits on a queue no worker serves yet
    held_queue = "faults-held"
    job = queue_job(owner, queue=held_queue)

    # When its owner cancels it (the revoke reaches no worker: none is running on that queue)
    assert lifecycle.job_cancel(job=job, by=owner).status == "cancelled"

    # Then a worker that starts on that queue takes the message and drops it, and after it restarts
    # (twice) nothing of the job is left to run: it never starts and stays cancelled
    for _restart in range(3):
        worker = start_worker(queue=held_queue)
        wait_until(
            lambda: job.celery_task_id not in broker.broker_task_ids(queues={held_queue}),
            timeout=60,
            what=f"the worker on {held_queue} to take the cancelled job's message",
        )
        worker.stop()
    job.refresh_from_db()
    assert job.status == "cancelled" and job.started_at is None
    assert not job.log_lines.filter(text__startswith="Started on").exists()


def test_soft_and_hard_time_limits_fail_the_job_for_good_and_the_worker_goes_on(
    fault_worker, owner, queue_job, reap, media_root, builtin_model
):
    slow = {"model_source": BUILTIN, **GPTQ, "calibration_samples": 64, "calibration_max_seq_len": 256}

    # Given a long GPTQ job with a soft time limit of 10 s: it ends as failed with "time limit"
    soft = _wait_status(queue_job(owner, soft_time_limit=10, **slow), "failed", "succeeded")
    assert soft.status == "failed" and "time limit of 10 s" in soft.error, soft.error

    # Given a job whose process hangs (SIGSTOP: it cannot even handle its soft limit of 4 s)
    hard = queue_job(owner, soft_time_limit=4, time_limit=8, **slow)
    _wait_running(hard, fault_worker)
    freeze(fault_worker.child_pid())
    # Then the hard limit kills it, and the worker's main process records "time limit"
    hard = _wait_status(hard, "failed", "succeeded", timeout=60)
    assert hard.status == "failed" and "time limit of 8 s" in hard.error, hard.error

    # ...neither is ever re-queued, not even by the reaper once their heartbeat is long silent
    Job.objects.filter(pk__in=[soft.pk, hard.pk]).update(heartbeat_at=None)
    assert reap() == []
    for job in (soft, hard):
        job.refresh_from_db()
        assert job.status == "failed" and job.requeue_count == 0
        assert job.log_lines.filter(text__startswith="Started on").count() == 1

    # ...housekeeping removes what the killed run left (but the layers a run finished, which a retry of the
    # failed job resumes from: jobs.resume_folders), and the next job runs on that same worker
    retention.job_remove_stale_partials()
    assert leftovers(media_root, soft) in ([], ["resume"]) and leftovers(media_root, hard) in ([], ["resume"])
    nxt = _wait_status(queue_job(owner), "succeeded", "failed")
    assert nxt.status == "succeeded" and nxt.worker == fault_worker.name, nxt.error


def test_the_reaper_fails_a_job_past_the_hard_limit_instead_of_requeueing_it(owner, make_job, settings, db):
    # Given a running job, silent, that started longer ago than the hard limit (its child was killed by it)
    from datetime import timedelta

    from django.utils import timezone

    settings.COMPRESSOR_JOB_HARD_LIMIT_S = 600
    long_ago = timezone.now() - timedelta(seconds=700)
    job = make_job(owner, status="running", started_at=long_ago, heartbeat_at=long_ago, worker="w")

    # When the reaper runs, it fails the job with "time limit" and does not re-queue it
    assert recovery.job_reap_stale() == [(job.pk, "failed")]
    job.refresh_from_db()
    assert job.status == "failed" and "time limit of 10 min" in job.error and job.requeue_count == 0
