"""The web process records and reads: after serving every page and API endpoint, and submitting a hub model
through the API and the form, it has imported neither torch nor transformers nor llm-compressor.

A real process of its own (the test process has long imported torch), on the test database and the
local hub, through Django's test client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.hub_server import llama_1b_files
from tests.support import REPO, database_url


@pytest.mark.django_db(transaction=True)
def test_the_web_process_never_imports_torch(make_user, make_job, checkpoint, hub, hub_repo_id, broker, media_root):
    from django.db import connection

    # Given an operator with a finished job (a checkpoint to download) and a 1 B model on the hub
    operator = make_user("operator", is_staff=True, is_superuser=True)
    job = make_job(operator)
    checkpoint(job)
    repo_id = hub_repo_id("llama-1b")
    hub.add_repo(repo_id, llama_1b_files())

    # When a web process of its own serves every page and endpoint and takes two submissions
    env = {
        **os.environ,
        **hub.env,
        "DATABASE_URL": database_url(connection.settings_dict),
        "COMPRESSOR_MEDIA_ROOT": str(media_root),
        "CELERY_BROKER_URL": broker["url"],
        # Its own corner of Redis: no worker of this session runs what it submits.
        "CELERY_KEY_PREFIX": f"{broker['prefix']}web-probe-{uuid.uuid4().hex[:6]}:",
        "COMPRESSOR_JOB_CREATE_RATE": "1000/hour",
    }
    probe = subprocess.run(
        [sys.executable, "tests/web_process_probe.py", operator.username, str(job.pk), repo_id],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert probe.returncode == 0, probe.stderr[-4000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])

    # Then it answered them all without a server error, submitted both, and imported none of the heavy libraries
    statuses = report["statuses"]
    assert not [url for url, status in statuses.items() if status >= 500], statuses
    assert statuses["POST /api/v1/jobs/"] == 201 and statuses["POST /jobs/new/"] == 302, statuses
    assert len(statuses) > 60, sorted(statuses)
    assert report["imported"] == [], report
