"""The stages are declared once (engine.spec.Stage): the model's choices, the progress weights, the pages'
timeline and the names the code uses all come from there."""

from __future__ import annotations

import ast
import re
from datetime import timedelta
from pathlib import Path

import pytest

from engine.spec import STAGES, CompressionSpec, EvaluationSpec, Stage
from engine.stages import Reporter

ROOT = Path(__file__).resolve().parents[2]


def test_the_model_and_the_run_take_their_stages_and_labels_from_the_declaration():
    from jobs.models import Job

    assert Job.Stage.choices == [(stage.value, stage.label) for stage in Stage]
    assert STAGES == tuple(Stage)[1:] and Stage.WAITING not in STAGES
    # The plan weighs, in the declared order, every stage a run of each kind reports
    reporter = Reporter(None, None)
    reporter.plan(CompressionSpec(evaluation=EvaluationSpec()), needs_calibration=True)
    assert list(reporter.costs) == [s for s in STAGES if s not in (Stage.COMPRESSING, Stage.DONE)]
    reporter.plan(CompressionSpec(), needs_calibration=False)
    assert list(reporter.costs) == [s for s in STAGES if s not in (Stage.CALIBRATING, Stage.EVALUATING, Stage.DONE)]


@pytest.mark.django_db
def test_the_timeline_has_every_stage_a_run_went_through_and_the_vllm_check_to_come(make_user, make_job):
    from django.utils import timezone

    from frontend.presentation import timeline
    from jobs.models import Job, JobLogLine
    from jobs.selectors import job_stage_started

    alice = make_user()
    now = timezone.now()
    # Given a finished job with a log line in every stage a run reports
    done = make_job(alice, status=Job.Status.SUCCEEDED, stage=Stage.DONE, started_at=now, finished_at=now)
    for stage in STAGES:
        JobLogLine.objects.create(job=done, stage=stage, text=f"{stage} line")
    # ...and a GPTQ job that is loading
    running = make_job(
        alice, preset="int8-w8a8-gptq", calibration_kind="builtin", status=Job.Status.RUNNING, stage=Stage.LOADING,
        started_at=now - timedelta(seconds=5), evaluation={"offline": True},
    )  # fmt: skip

    # Then the finished one's timeline lists every declared stage, in order, with its label
    steps = timeline(done, job_stage_started(job=done))
    assert [step.key for step in steps] == [stage for stage in Stage if stage is not Stage.DONE]
    assert [step.label for step in steps] == [stage.label for stage in Stage if stage is not Stage.DONE]
    # ...and the running one lists the vLLM check among the stages to come
    labels = [step.label for step in timeline(running, job_stage_started(job=running))]
    assert labels == [
        "Waiting in the queue", "Preparing", "Loading", "Calibrating and compressing", "Saving", "Checking in vLLM",
        "Evaluating", "Writing the card and hashing the files",
    ]  # fmt: skip


def test_no_stage_is_named_by_a_bare_string_in_the_product_code():
    names = {stage.value for stage in Stage}
    calls = re.compile(r"\b(emit|ProgressEvent|_append_log|_stage)\b")
    offenders = []
    for package in ("engine", "jobs", "frontend"):
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            source = path.read_text()
            for node in ast.walk(ast.parse(source)):
                # A stage handed to the reporter, to a ProgressEvent, to the log, or a stage's default
                if isinstance(node, ast.Call) and calls.search(ast.unparse(node.func)):
                    arguments = [*node.args, *(k.value for k in node.keywords if k.arg == "stage")]
                    strings = [a for a in ast.walk(ast.Tuple(elts=arguments)) if isinstance(a, ast.Constant)]
                    offenders += [f"{path.relative_to(ROOT)}:{a.lineno}" for a in strings if a.value in names]
    assert offenders == []
