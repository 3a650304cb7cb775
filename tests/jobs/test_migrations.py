"""The jobs app's migrations: the models need none that is missing, and the index change of 0010 keeps every job.

Runs on SQLite here (where 0010 rebuilds the table) and on PostgreSQL in test_jobs_postgres (where it drops
indexes).
"""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE_INDEX_CHANGE = [("jobs", "0009_job_checkpoint_bytes")]


def _migrate(targets: list[tuple[str, str]] | None = None):
    """Migrate the test database to targets (None: the latest) and return the app registry of that state."""
    executor = MigrationExecutor(connection)
    targets = targets or executor.loader.graph.leaf_nodes()
    executor.migrate(targets)
    executor.loader.build_graph()
    return executor.loader.project_state(targets).apps


def _job_index_columns() -> list[tuple[str, ...]]:
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, "jobs_job")
    return sorted(tuple(c["columns"]) for c in constraints.values() if c["index"] and not c["primary_key"])


def test_the_models_need_no_migration_that_is_missing():
    out = io.StringIO()
    try:
        call_command("makemigrations", "--check", "--dry-run", stdout=out)
    except SystemExit:
        pytest.fail(f"The models have changes that no migration records:\n{out.getvalue()}")


def test_a_job_stored_before_the_index_change_keeps_its_fields_log_lines_and_checkpoint_size():
    old = _migrate(BEFORE_INDEX_CHANGE)
    owner = old.get_model("auth", "User").objects.create(username="from-before")
    job = old.get_model("jobs", "Job").objects.create(
        owner_id=owner.pk,
        preset="fp8-dynamic",
        status="succeeded",
        spec_fingerprint="f" * 64,
        celery_task_id="task-before",
        results={"size_after_bytes": 123_456},
    )
    old.get_model("jobs", "JobLogLine").objects.create(job_id=job.pk, stage="saving", text="Checkpoint written.")

    new = _migrate()
    jobs = new.get_model("jobs", "Job").objects
    kept = jobs.get(pk=job.pk)
    assert (kept.owner_id, kept.preset, kept.status, kept.spec_fingerprint, kept.celery_task_id) == (
        owner.pk,
        "fp8-dynamic",
        "succeeded",
        "f" * 64,
        "task-before",
    )
    assert kept.checkpoint_bytes == 123_456  # the generated column survives the rebuild
    assert [line.text for line in kept.log_lines.all()] == ["Checkpoint written."]
    # The lookups the services make by these columns still find it.
    assert jobs.get(celery_task_id="task-before", status="succeeded").pk == job.pk
    assert jobs.filter(owner_id=owner.pk, status="succeeded", spec_fingerprint="f" * 64).count() == 1


def test_each_job_index_exists_once_and_none_only_repeats_the_first_column_of_another():
    # PostgreSQL's db_index on a CharField added a LIKE-only copy (varchar_pattern_ops) of the same column, and
    # status and owner had indexes of their own although job_queue_order and job_owner_* begin with them.
    assert _job_index_columns() == [
        ("calibration_file_id",),
        ("celery_task_id",),
        ("created_at",),
        ("owner_id", "created_at"),
        ("owner_id", "status", "checkpoint_bytes"),
        ("preset",),
        ("retry_of_id",),
        ("spec_fingerprint",),
        ("status", "queue", "priority", "created_at"),
    ]
