"""Fixtures for the jobs tests: an isolated broker, a private media folder, users with tokens, job
factories, and a real Celery worker process (no eager mode) against the real Redis and the test database.

Isolation: every test session publishes under its own Redis key prefix (CELERY_KEY_PREFIX), so parallel
runs on one Redis never take each other's messages; on SQLite the test database is a file (a worker in
another process cannot open an in-memory one); on PostgreSQL it is pytest-django's test_<name> database.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import QUEUES, LiveWorker, running_worker, wait_until, worker_env

# --- users, API clients and factories ---------------------------------------------------------------------


@pytest.fixture
def user(make_user):
    return make_user("alice")


@pytest.fixture
def other_user(make_user):
    return make_user("bob")


@pytest.fixture
def api_for():
    """An API client authenticated as the user with a real token (TokenAuthentication)."""
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    def client(user) -> APIClient:
        api = APIClient()
        token, _ = Token.objects.get_or_create(user=user)
        api.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
        return api

    return client


@pytest.fixture
def api(api_for, user):
    return api_for(user)


@pytest.fixture
def checkpoint(media_root):
    """Give a job a small succeeded checkpoint on disk (files and a sha256 manifest) without the engine."""
    from engine.artifacts import write_manifest

    def make(job, files: dict[str, bytes] | None = None):
        files = files or {
            "model.safetensors": os.urandom(300_000),
            "config.json": b'{"model_type": "llama"}',
            "README.md": b"# model card\n",
        }
        relpath = job.artifacts_relpath()
        folder = Path(media_root) / relpath
        shutil.rmtree(folder.parent, ignore_errors=True)  # ids repeat after rolled-back tests
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        manifest = write_manifest(folder)
        job.status, job.artifacts_path, job.manifest, job.results = "succeeded", relpath, manifest, {"ok": True}
        job.save()
        return folder

    return make


# --- the live worker ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def live_worker_process(django_db_setup, broker, media_root, hub_server, tmp_path_factory) -> Iterator[LiveWorker]:
    """`celery worker` as its own process on this session's queues and test database (started once), with the
    session's local hub as its Hugging Face hub."""
    from django.db import connection

    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    env = worker_env(
        settings_dict=connection.settings_dict,
        broker=broker,
        media_root=media_root,
        COMPRESSOR_CANCEL_GRACE_S="5",
        **hub_server.env,
    )
    with running_worker(prefix="test", queues=QUEUES, log_path=log_path, env=env) as worker:
        yield worker


@pytest.fixture
def live_worker(live_worker_process, transactional_db) -> Iterator[LiveWorker]:
    """The session's worker, consuming; each test leaves it idle with empty queues for the next."""
    live_worker_process.resume()
    yield live_worker_process
    live_worker_process.resume()
    wait_until(lambda: not live_worker_process.active(), timeout=300, what="the worker to finish its task")
    from compressor_app.celery import app

    with app.connection_for_write() as conn:
        for queue in QUEUES:
            conn.default_channel.queue_purge(queue)


@pytest.fixture
def wait_for():
    """wait_for(predicate, timeout=..., what=...): poll until truthy, or fail naming what did not happen."""
    return wait_until


@pytest.fixture
def wait_job():
    from jobs.models import Job

    # Deadlines that hold on a loaded machine (load 6+ on two cores): a wait ends as soon as the job does.
    def wait(job_id: int, *statuses: str, timeout: float = 900) -> Job:
        def reached():
            job = Job.objects.get(pk=job_id)
            return job if job.status in statuses else None

        return wait_until(reached, timeout=timeout, what=f"job {job_id} to become {' or '.join(statuses)}")

    return wait
