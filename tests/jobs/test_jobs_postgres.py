"""The worker integration tests (all but the GPTQ retry), the state machine, the quota lock and the migrations
again, on PostgreSQL.

Django reads its database settings once per process, so this runs them in a second pytest process with
DATABASE_URL pointing at the local PostgreSQL (pytest-django creates and drops test_<name> there).
PostgreSQL comes from scripts/ensure_services.sh (make test); where none answers the test is skipped,
unless COMPRESSOR_REQUIRE_POSTGRES=1 (CI) makes that a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("COMPRESSOR_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")

pytestmark = pytest.mark.slow


def _postgres_answers() -> str | None:
    import psycopg

    try:
        with psycopg.connect(f"{PG_URL.replace('postgres://', 'postgresql://')}/postgres", connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return str(exc).strip()


@pytest.mark.skipif(os.environ.get("COMPRESSOR_IN_POSTGRES_RUN") == "1", reason="already the PostgreSQL run")
def test_worker_integration_and_state_machine_on_postgresql(tmp_path):
    problem = _postgres_answers()
    if problem:
        if os.environ.get("COMPRESSOR_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL does not answer at {PG_URL}: {problem}")
        pytest.skip(f"PostgreSQL does not answer at {PG_URL}: {problem}")
    env = {
        **os.environ,
        "DATABASE_URL": f"{PG_URL}/compressor_jobs_{os.getpid()}",
        "COMPRESSOR_IN_POSTGRES_RUN": "1",
    }
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--create-db",
        "tests/jobs/test_jobs_worker.py", "tests/jobs/test_jobs_services.py", "tests/jobs/test_migrations.py",
        "tests/jobs/postgres_connections.py",  # the kept connections' health check: PostgreSQL only
        # The owner's lock is PostgreSQL's row lock (SQLite's transactions lock the whole database instead).
        "tests/policy/test_limits.py::test_fifty_parallel_submissions_stop_at_the_active_jobs_quota",
        # The GPTQ retry run is the slowest worker test and exercises nothing database-specific beyond
        # what the others do; it runs on SQLite, and job_retry runs here in the services tests.
        "-k", "not retried_as_a_new_linked_job",
    ]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    report = run.stdout[-6000:] + run.stderr[-3000:]
    assert run.returncode == 0, report
    assert " passed" in run.stdout and " skipped" not in run.stdout.splitlines()[-1], report
