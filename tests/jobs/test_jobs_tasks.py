"""The compress task's own part, run in this process: what it hands the engine from the worker's settings,
and how the engine's refusal ends the job."""

import pytest

from jobs.models import Job
from jobs.tasks import compress_job

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_workers_caps_reach_the_memory_plan_and_its_refusal_fails_the_job(make_user, make_job, settings):
    # Given a worker whose operator caps host memory at 100 MB, and a queued job on the built-in model
    settings.COMPRESSOR_WORKER_HOST_RAM_MB = 100
    job = make_job(make_user())

    # When the worker's task runs it
    compress_job.apply(args=[job.pk], task_id=job.celery_task_id)

    # Then the job failed before the model was loaded, with the plan's figures, and left no checkpoint
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED
    assert "This model does not fit on this worker" in job.error and "100.0 MB available" in job.error
    assert not job.artifacts_path
