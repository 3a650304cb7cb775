"""Data-parallel calibration for real: llm-compressor's distributed GPTQ under torchrun, two ranks talking over
gloo on this CPU machine (one rank per GPU on a GPU worker), against the same job in one process."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from engine.artifacts import verify_manifest
from engine.data_parallel import gathered_layer_errors, job_log_line, output_lines
from engine.errors import CancelledError
from engine.layer_resume import INDEX_NAME
from engine.resources import WorkerCaps
from engine.runner import compress
from engine.spec import CalibrationSpec, CompressionSpec
from tests.support import wait_until

pytestmark = pytest.mark.slow


def _spec(model_dir) -> CompressionSpec:
    return CompressionSpec(
        model=str(model_dir), preset="int8-w8a8-gptq", calibration=CalibrationSpec(samples=16, max_seq_len=64)
    )


def _ranks_running() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "engine.dp_rank" in cmdline:
            found.append(process)
    return found


def test_two_ranks_give_the_checkpoint_one_process_gives(tiny_model_dir, tmp_path):
    # Given the same GPTQ job in one process and over two data-parallel ranks
    events = []
    single = compress(_spec(tiny_model_dir), tmp_path / "single", caps=WorkerCaps(data_parallel=1))
    parallel = compress(
        _spec(tiny_model_dir), tmp_path / "parallel", caps=WorkerCaps(data_parallel=2), progress=events.append
    )

    # Then the plan said two ranks, and the ranks' log reached the job (rank 0's messages, no progress bars)
    plan = parallel.settings["memory_plan"]
    assert plan["data_parallel"] == 2 and "data-parallel over 2 ranks (gloo between CPU processes)" in plan["summary"]
    assert single.settings["memory_plan"]["data_parallel"] == 1
    lines = [event.log_line for event in events if event.log_line]
    assert "Calibrated over 2 ranks; writing the checkpoint" in lines
    assert not any("%|" in line or line.startswith("[Rank 1]") for line in lines)
    # ...the checkpoint is complete and verified, with the tokenizer and the recipe
    assert verify_manifest(parallel.output_dir) == []
    assert (parallel.output_dir / "tokenizer.json").is_file() and (parallel.output_dir / "recipe.yaml").is_file()
    # ...and its int8 weights are the single process's, but for GPTQ's rounding: each rank calibrated on its
    # half of the samples and their Hessians added up to the single process's (up to the order of the sums)
    one = load_file(single.output_dir / "model.safetensors")
    two = load_file(parallel.output_dir / "model.safetensors")
    assert one.keys() == two.keys()
    weights = [name for name in one if name.endswith(".weight") and one[name].dtype == torch.int8]
    assert weights, "the checkpoint holds int8 weights"
    agree = {name: (one[name] == two[name]).float().mean().item() for name in weights}
    assert sum(agree.values()) / len(agree) > 0.95, agree
    # ...every module, whichever rank ran its GPTQ (on a CPU worker each rank holds its own copy of the model,
    # so the owner's result must be broadcast: without it rank 0 saved some modules' weights unrounded by GPTQ)
    assert min(agree.values()) > 0.8, agree
    for name in weights:
        assert (one[name].int() - two[name].int()).abs().max().item() <= 3, f"{name} differs by more than 3 steps"
    # ...and the results hold a GPTQ error for every module the single process measured, whichever rank ran it
    modules = [e["module"] for e in parallel.layer_errors]
    assert len(modules) == len(set(modules)) and set(modules) == {e["module"] for e in single.layer_errors}
    assert all(math.isfinite(e["error"]) and e["error"] >= 0 for e in parallel.layer_errors)
    assert _ranks_running() == []


LAYERS = 12  # enough that the ranks are stopped well before the last layer however late the test sees the store

# The interrupted job: the data-parallel run in a child process, which the test kills with its ranks.
_CHILD = """
import json, sys
from pathlib import Path
from engine.resources import WorkerCaps
from engine.runner import compress
from engine.spec import CompressionSpec

spec = CompressionSpec.from_dict(json.loads(sys.argv[1]))
compress(spec, Path(sys.argv[2]), resume_dir=Path(sys.argv[3]), caps=WorkerCaps(data_parallel=2))
"""


@pytest.fixture(scope="module")
def twelve_layer_model(tiny_model_with_layers) -> Path:
    return tiny_model_with_layers(LAYERS)


def _kill_with_ranks_once_stored(spec: CompressionSpec, out: Path, resume_dir: Path, layers: int) -> dict:
    """Run the job in a child process; once its store names `layers` layers, freeze the child and every rank
    (SIGSTOP, so that none stores another layer meanwhile), then SIGKILL them all; return the store's index."""
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

        def stored() -> bool:
            if child.poll() is not None:
                raise AssertionError(f"the child ended early ({child.returncode}):\n{child.stdout.read()[-3000:]}")
            try:
                return len(json.loads((resume_dir / INDEX_NAME).read_text())["done"]) >= layers
            except (OSError, ValueError):
                return False

        wait_until(stored, timeout=300, interval=0.005, what=f"the ranks to store {layers} layers")
    finally:
        family = [child.pid, *(p.pid for p in psutil.Process(child.pid).children(recursive=True))]
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in family:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        child.wait(timeout=30)
    wait_until(lambda: _ranks_running() == [], timeout=30, what="the killed ranks to be gone")
    return json.loads((resume_dir / INDEX_NAME).read_text())


def test_a_data_parallel_run_killed_after_n_layers_resumes_from_them_to_the_uninterrupted_checkpoint(
    twelve_layer_model, tmp_path
):
    # Given the checkpoint of an uninterrupted two-rank run (which removes its layer store once published)
    spec = _spec(twelve_layer_model)
    caps = WorkerCaps(data_parallel=2)
    uninterrupted = compress(spec, tmp_path / "uninterrupted", caps=caps, resume_dir=tmp_path / "resume-whole")
    assert not (tmp_path / "resume-whole").exists()

    # When the same job's process and ranks are killed after rank 0 stored at least two layers
    resume_dir = tmp_path / "resume"
    index = _kill_with_ranks_once_stored(spec, tmp_path / "killed", resume_dir, layers=2)
    done = len(index["done"])
    assert index["done"] == list(range(done)) and 2 <= done < LAYERS and index["total"] == LAYERS
    assert not (tmp_path / "killed").exists(), "a killed run publishes nothing"

    # ...and the job runs again over two ranks with the store the killed run left
    events = []
    resumed = compress(spec, tmp_path / "resumed", caps=caps, resume_dir=resume_dir, progress=events.append)

    # Then rank 0 says where they resumed, and no rank compressed a restored layer again
    lines = [event.log_line for event in events if event.log_line]
    assert f"Resuming from layer {done} of {LAYERS} (layers 0–{done - 1} restored from the interrupted run)" in lines
    quantized = " ".join(line for line in lines if "Quantizing" in line)
    assert f"model.layers.{done}." in quantized
    assert not any(f"model.layers.{layer}." in quantized for layer in range(done))
    # ...the restored layers' errors are those both ranks measured in the killed run: every module once
    modules = [e["module"] for e in resumed.layer_errors]
    assert len(modules) == len(set(modules)) and set(modules) == {e["module"] for e in uninterrupted.layer_errors}
    # ...the checkpoint is the uninterrupted run's, tensor by tensor, bit for bit
    ours = load_file(resumed.output_dir / "model.safetensors")
    theirs = load_file(uninterrupted.output_dir / "model.safetensors")
    assert ours.keys() == theirs.keys() and any(key.endswith("weight_scale") for key in ours)
    assert [key for key in ours if not torch.equal(ours[key], theirs[key])] == []
    assert resumed.layer_errors == uninterrupted.layer_errors
    # ...and the store is gone once the checkpoint is published
    assert not resume_dir.exists() and _ranks_running() == []


def test_the_ranks_layer_errors_come_back_once_each_layer_by_layer(tmp_path):
    # Given two ranks' files: each module a rank compressed, and one module both measured
    (tmp_path / "rank-0.json").write_text(
        json.dumps([{"module": "model.layers.10.mlp.up_proj", "error": 1.0}, {"module": "lm_x", "error": 9.0}])
    )
    (tmp_path / "rank-1.json").write_text(
        json.dumps([{"module": "model.layers.2.mlp.up_proj", "error": 2.0}, {"module": "lm_x", "error": 8.0}])
    )

    # Then layer 2 comes before layer 10 (numbers compare as numbers), and the shared module once, as rank 0 had it
    gathered = gathered_layer_errors(tmp_path.glob("rank-*.json"))
    assert gathered == [
        {"module": "lm_x", "error": 9.0},
        {"module": "model.layers.2.mlp.up_proj", "error": 2.0},
        {"module": "model.layers.10.mlp.up_proj", "error": 1.0},
    ]


def test_a_cancel_stops_every_rank(tiny_model_dir, tmp_path):
    # Given a data-parallel job whose ranks are running
    cancel = threading.Event()
    errors = []

    def run() -> None:
        try:
            compress(
                _spec(tiny_model_dir),
                tmp_path / "cancelled",
                caps=WorkerCaps(data_parallel=2),
                should_cancel=cancel.is_set,
            )
        except CancelledError as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 180
    while len(_ranks_running()) < 2:
        assert time.monotonic() < deadline, "waited 180 s for two engine.dp_rank processes to start"
        time.sleep(0.2)

    # When the job is cancelled
    cancel.set()
    worker.join(timeout=60)

    # Then the run stopped as cancelled, no rank is left, and no checkpoint was written
    assert not worker.is_alive() and errors, "compress() raised CancelledError within 60 s"
    assert _ranks_running() == []
    assert not (tmp_path / "cancelled").exists()


@pytest.mark.parametrize(
    ("line", "kept"),
    [
        (
            "[Rank 0] 2026-12-01T10:00:15.5 | finalize | INFO - Compression lifecycle finalized",
            "Compression lifecycle finalized",
        ),
        ("[Rank 0] 2026-12-01T10:00:15.5 | compress | WARNING - RTN fallback", "WARNING: RTN fallback"),
        ("[Rank 1] 2026-12-01T10:00:15.5 | finalize | INFO - Compression lifecycle finalized", None),
        ("(1/3): Calibrating:  50%|█████     | 8/16 [00:01<00:01, 7.9it/s]", None),
        ("Calibrated over 2 ranks; writing the checkpoint", "Calibrated over 2 ranks; writing the checkpoint"),
    ],
)
def test_the_job_log_keeps_rank_zeros_messages(line, kept):
    assert job_log_line(line) == kept


_BAR = "\rCompressing model:   0%|          | 0/7 [00:00<?, ?it/s]"


@pytest.mark.parametrize(
    ("raw", "lines"),
    [
        # another rank's bar was drawn just before rank 0's line: the CI run that lost "Calibrated over 2 ranks"
        (
            _BAR + "Calibrated over 2 ranks; writing the checkpoint\n",
            ["Calibrated over 2 ranks; writing the checkpoint"],
        ),
        (
            _BAR + "\x1b[A[Rank 1] 2026-12-01T10:00:15.5 | finalize | INFO - Compression lifecycle finalized\n",
            ["[Rank 1] 2026-12-01T10:00:15.5 | finalize | INFO - Compression lifecycle finalized"],
        ),
        (_BAR + "\rCompressing model: 100%|██████████| 7/7 [00:00<00:00, 45.62it/s]\n", []),
        ("Loading: 3it [00:02,  1.49s/it]Resuming from layer 2 of 12\n", ["Resuming from layer 2 of 12"]),
        (
            "Quantizing 1 module(s): ['model.layers.0.mlp.up_proj'] [00:01]\n",
            ["Quantizing 1 module(s): ['model.layers.0.mlp.up_proj'] [00:01]"],
        ),
    ],
)
def test_a_progress_bar_is_cut_off_the_line_another_rank_wrote_after_it(raw, lines):
    assert output_lines(raw) == lines
