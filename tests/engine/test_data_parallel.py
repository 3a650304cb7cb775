"""Data-parallel calibration for real: llm-compressor's distributed GPTQ under torchrun, two ranks talking over
gloo on this CPU machine (one rank per GPU on a GPU worker), against the same job in one process."""

from __future__ import annotations

import json
import math
import threading
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from engine.artifacts import verify_manifest
from engine.data_parallel import gathered_layer_errors, job_log_line
from engine.errors import CancelledError
from engine.resources import WorkerCaps
from engine.runner import compress
from engine.spec import CalibrationSpec, CompressionSpec

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
