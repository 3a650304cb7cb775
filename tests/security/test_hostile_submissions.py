"""Job fields other than the recipe, as an attacker fills them: a 400 naming the field, nothing stored."""

from __future__ import annotations

import pytest

from jobs.models import Job

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("revision", ["../../etc", "$(id)", "a" * 200, "main"])
def test_a_revision_for_the_built_in_model_is_a_400_naming_the_revision(api, revision):
    body = {"model": "smollm2-135m-instruct", "revision": revision, "preset": "fp8-dynamic"}

    response = api.post("/api/v1/jobs/", body, format="json")

    assert response.status_code == 400, response.content
    assert list(response.json()) == ["revision"], response.json()
    assert not Job.objects.exists()


@pytest.mark.parametrize("revision", ["../../etc", "$(id)", "a" * 201])
def test_a_hub_models_revision_follows_the_same_rule(api, revision):
    body = {"model": "some-org/some-model", "revision": revision, "preset": "fp8-dynamic"}

    response = api.post("/api/v1/jobs/", body, format="json")

    assert response.status_code == 400, response.content
    assert list(response.json()) == ["revision"], response.json()


def test_a_task_named_49_times_is_run_once(api):
    body = {"preset": "fp8-dynamic", "evaluation": {"tasks": ["compressor_arithmetic"] * 49 + ["arc_easy"]}}

    response = api.post("/api/v1/jobs/", body, format="json")

    assert response.status_code == 201, response.content
    assert Job.objects.get().evaluation["tasks"] == ["compressor_arithmetic", "arc_easy"]


# A web process as gunicorn or runserver starts one: Django set up, then its first submission's task check.
_FIRST_SUBMISSION = """
import json, sys, time
import django

started = time.perf_counter()
django.setup()
setup_s = time.perf_counter() - started
from engine.spec import EvaluationSpec
from engine.submission import check_tasks

started = time.perf_counter()
check_tasks(EvaluationSpec(tasks=("arc_easy", "hellaswag", "compressor_arithmetic")))
print(json.dumps({"setup_s": setup_s, "check_s": time.perf_counter() - started, "torch": "torch" in sys.modules}))
"""


def test_a_new_web_process_builds_the_task_index_as_it_starts_so_the_first_submission_answers_at_once(tmp_path):
    import json
    import os
    import subprocess
    import sys

    # Given a machine where lm-eval's task index was never built (an empty tasks folder)
    env = {**os.environ, "COMPRESSOR_TASKS_DIR": str(tmp_path / "lm_tasks"), "DJANGO_ENV": "development"}
    env.setdefault("DJANGO_SETTINGS_MODULE", "compressor_app.settings")

    # When a web process starts and checks its first submission's tasks
    run = subprocess.run(
        [sys.executable, "-c", _FIRST_SUBMISSION], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    figures = json.loads(run.stdout.strip().splitlines()[-1])

    # Then the index was built while it started, the check took well under half a second, and no torch
    assert list((tmp_path / "lm_tasks").glob("task-names-*.json")), run.stderr
    assert figures["check_s"] < 0.5, figures
    assert not figures["torch"]
