"""A search runs the plain run's pipeline (engine.runner), so it gets what that pipeline gives a run: a search
SIGKILLed in the middle of a trial resumes from the layers that trial kept, to the checkpoint an uninterrupted
search writes, and a search on a worker that calibrates data-parallel runs its trials over the ranks.

The interrupted search is a real child process, stopped (and SIGKILLed by the test) while GPTQ quantizes
layer 2 of 4 of its first trial, as tests/engine/test_resume.py stops a plain run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.layer_resume import INDEX_NAME
from engine.resources import WorkerCaps
from engine.runner import compress
from engine.spec import CalibrationSpec, CompressionSpec, EvaluationSpec, QualityFloor, SearchBudget, SearchSpec
from tests.support import wait_until

LAYERS = 4

# The interrupted search: stop for good once GPTQ quantizes layer 2 of the first trial (layers 0 and 1 are
# stored by then); the parent SIGKILLs it.
_CHILD = """
import json, sys, time
from pathlib import Path
from engine.runner import compress
from engine.spec import CompressionSpec

spec = CompressionSpec.from_dict(json.loads(sys.argv[1]))

def progress(event):
    # GPTQ's line: "Quantizing 1 module(s): ['model.layers.2.self_attn.q_proj']"
    if event.log_line and "Quantizing" in event.log_line and "'model.layers.2." in event.log_line:
        print("stopped at layer 2", flush=True)
        time.sleep(3600)

compress(spec, Path(sys.argv[2]), resume_dir=Path(sys.argv[3]), progress=progress)
"""


@pytest.fixture(scope="module")
def four_layer_model(tiny_model_with_layers) -> Path:
    return tiny_model_with_layers(LAYERS)


@pytest.fixture(autouse=True)
def eval_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_EVAL_CACHE", str(tmp_path / "eval-cache"))


def _search_spec(model: Path, trials: int) -> CompressionSpec:
    return CompressionSpec(
        model=str(model),
        preset="int8-w8a8-gptq",
        calibration=CalibrationSpec(samples=4, max_seq_len=32),
        evaluation=EvaluationSpec(limit=2),
        search=SearchSpec(floor=QualityFloor(at_least=1.0), budget=SearchBudget(max_trials=trials)),
    )


def _kill_in_first_trial(spec: CompressionSpec, out: Path, resume_dir: Path) -> dict:
    """Run the search in a child process, SIGKILL it once its first trial stored layers 0 and 1; the index."""
    repo = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(spec.to_dict()), str(out), str(resume_dir)],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def stored() -> dict | None:
            if child.poll() is not None:
                raise AssertionError(f"the child ended early ({child.returncode}):\n{child.stdout.read()[-3000:]}")
            index = resume_dir / "trial-1" / INDEX_NAME
            done = json.loads(index.read_text()) if index.is_file() else None
            return done if done and len(done["done"]) >= 2 else None

        index = wait_until(stored, timeout=300, what="the child's first trial to store layers 0 and 1")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    return index


def test_a_search_killed_in_a_trial_resumes_from_its_stored_layers_to_the_uninterrupted_checkpoint(
    four_layer_model, tmp_path
):
    # Given the checkpoint of an uninterrupted search (its layer stores removed once published)
    spec = _search_spec(four_layer_model, trials=1)
    uninterrupted = compress(spec, tmp_path / "uninterrupted", resume_dir=tmp_path / "resume-uninterrupted")
    assert not (tmp_path / "resume-uninterrupted").exists()

    # When the same search is SIGKILLed while its first trial quantizes layer 2 of 4
    resume_dir = tmp_path / "resume"
    index = _kill_in_first_trial(spec, tmp_path / "killed", resume_dir)
    assert index["done"] == [0, 1] and index["total"] == LAYERS
    assert not (tmp_path / "killed").exists(), "a killed search publishes nothing"

    # ...and runs again with what it kept
    events = []
    resumed = compress(spec, tmp_path / "resumed", resume_dir=resume_dir, progress=events.append)

    # Then its first trial says where it resumed and quantizes only the layers that were not done
    messages = [event.message for event in events if event.message]
    assert "Resuming from layer 2 of 4 (layers 0–1 restored from the interrupted run)" in messages
    first_trial = _log_lines_between(events, "Trial 1 of", "Trial 2 of")
    quantized = [line for line in first_trial if "Quantizing" in line]
    assert quantized and not any("model.layers.0." in line or "model.layers.1." in line for line in quantized)
    # ...its trials measure what the uninterrupted search's did, and it chooses the same checkpoint, bit for bit
    measured = [
        [(t["recovery"], t["size_bytes"]) for t in run.settings["search"]["trials"]] for run in (resumed, uninterrupted)
    ]
    assert measured[0] == measured[1]
    assert resumed.layer_errors == uninterrupted.layer_errors
    ours, theirs = (load_file(run.output_dir / "model.safetensors") for run in (resumed, uninterrupted))
    assert ours.keys() == theirs.keys() and [key for key in ours if not torch.equal(ours[key], theirs[key])] == []
    # ...and every trial's store is gone once the checkpoint is published
    assert not resume_dir.exists()


def _log_lines_between(events, start: str, end: str) -> list[str]:
    """The log lines after the message that begins with `start`, up to the one that begins with `end`."""
    lines, inside = [], False
    for event in events:
        if event.message and event.message.startswith(start):
            inside = True
        elif event.message and event.message.startswith(end):
            break
        elif inside and event.log_line:
            lines.append(event.log_line)
    return lines


def test_a_search_on_a_data_parallel_worker_plans_and_runs_its_trials_over_the_ranks(four_layer_model, tmp_path):
    # Given a worker whose operator asks for two calibration ranks (COMPRESSOR_WORKER_DATA_PARALLEL=2)
    events = []
    spec = _search_spec(four_layer_model, trials=1)

    # When a search runs there
    result = compress(spec, tmp_path / "ckpt", caps=WorkerCaps(data_parallel=2), progress=events.append)

    # Then its plan calibrates over two ranks, its trial ran over them, and the trial's errors came back
    plan = result.settings["memory_plan"]
    assert plan["data_parallel"] == 2 and "data-parallel over 2 ranks" in plan["summary"]
    messages = [event.message for event in events if event.message]
    assert "Calibrating and compressing over 2 data-parallel ranks" in messages
    (trial,) = result.settings["search"]["trials"]
    assert trial["preset"] == "int8-w8a8-gptq" and trial["recovery"] > 0
    assert {entry["module"] for entry in result.layer_errors} >= {f"model.layers.{i}.mlp.down_proj" for i in range(4)}
