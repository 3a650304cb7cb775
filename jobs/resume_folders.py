"""Where a job's run keeps the layers it compressed (engine.layer_resume), and who may pick them up.

The folder is jobs/<id>/resume (jobs.services.storage.job_resume_folder). Its life:
- attempt 2 of the same job (re-queued after its worker died) finds it where attempt 1 left it;
- a retry of a failed job (job_retry: same request, retry_of) takes it over from the failed job, which
  keeps it until then; a clone (retry_of, but an edited request) never does;
- it goes when the job succeeds (the engine removes it once the checkpoint is published), when the job is
  cancelled (with the rest of the job's folder), and with the job's folder after the retention period.
The engine itself checks the store's fingerprint (recipe, weights, calibration tokens, device, libraries)
and ignores anything that is not exactly this work.
"""

from __future__ import annotations

import os
from pathlib import Path

from jobs.models import Job
from jobs.services.storage import job_resume_folder


def job_take_resume_folder(*, job: Job) -> Path:
    """The resume folder for this run of the job: its own, or, for a retry without one, the retried job's."""
    own = job_resume_folder(job)
    retried = job.retry_of
    same_request = retried is not None and retried.spec_fingerprint == job.spec_fingerprint
    if not own.exists() and same_request and retried.status == Job.Status.FAILED:
        previous = job_resume_folder(retried)
        if previous.is_dir():
            own.parent.mkdir(parents=True, exist_ok=True)
            os.replace(previous, own)  # one job holds the layers at a time: the retry now
    return own
