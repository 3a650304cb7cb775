import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import engine.evaluation as evaluation
from engine.artifacts import verify_manifest
from engine.errors import CancelledError, EngineError, PreflightError
from engine.resources import WorkerCaps
from engine.runner import compress
from engine.spec import CalibrationSpec, CompressionSpec, EvaluationSpec


def test_tiny_model_compresses_into_a_verified_checkpoint(tiny_model_dir, tmp_path):
    events = []
    out = tmp_path / "ckpt"
    result = compress(CompressionSpec(model=str(tiny_model_dir), preset="fp8-dynamic"), out, progress=events.append)
    assert out.is_dir() and verify_manifest(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"model.safetensors", "config.json", "recipe.yaml", "results.json"} <= {f["path"] for f in manifest["files"]}
    assert result.size_after_bytes < result.size_before_bytes
    stages = [e.stage for e in events if e.log_line is None]
    assert stages[0] == "preparing" and "loading" in stages and "saving" in stages and stages[-1] == "done"
    assert any(e.log_line for e in events)  # llm-compressor's own log lines reach the callback


@pytest.fixture(scope="module")
def gptq_run(tiny_model_dir, tmp_path_factory):
    """The tiny model through int8-w8a8-gptq with the built-in calibration set and a short evaluation."""
    events = []
    spec = CompressionSpec(
        model=str(tiny_model_dir),
        preset="int8-w8a8-gptq",
        calibration=CalibrationSpec(samples=4, max_seq_len=32),
        evaluation=EvaluationSpec(limit=2),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPRESSOR_EVAL_CACHE", str(tmp_path_factory.mktemp("eval-cache")))
        result = compress(spec, tmp_path_factory.mktemp("gptq") / "ckpt", progress=events.append)
    return result, [event for event in events if event.log_line is None]


def test_calibrated_run_reports_each_layer_and_its_error_under_the_modules_real_name(tiny_model_dir, gptq_run):
    from transformers import AutoModelForCausalLM

    result, events = gptq_run
    layer_steps = [(e.step, e.total) for e in events if e.message.startswith("Layer")]
    assert layer_steps == [(1, 2), (2, 2)]
    # One entry per quantized Linear, named as in the model (not "GPTQ"), with the error at full precision
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    linears = {name for name, module in model.named_modules() if type(module).__name__ == "Linear"} - {"lm_head"}
    assert sorted(entry["module"] for entry in result.layer_errors) == sorted(linears)
    assert "model.layers.1.mlp.down_proj" in linears and len(linears) == 14
    errors = [entry["error"] for entry in result.layer_errors]
    assert all(error >= 0 for error in errors) and any(error != round(error, 2) for error in errors)
    saved = json.loads((result.output_dir / "results.json").read_text())["layer_errors"]
    assert saved == result.layer_errors


def test_stages_follow_what_ran_and_progress_moves_through_the_evaluation(gptq_run):
    result, events = gptq_run
    stages = [stage for i, stage in enumerate(e.stage for e in events) if i == 0 or events[i - 1].stage != stage]
    # GPTQ calibrates and compresses in one stage; the card and the hashes come after the evaluation
    assert stages == ["preparing", "loading", "calibrating", "saving", "evaluating", "hashing", "done"]
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] == 1
    evaluating = [e.fraction for e in events if e.stage == "evaluating"]
    assert len(set(evaluating)) >= 6  # window by window, generation by generation, for both models
    before = max(e.fraction for e in events if e.stage == "saving")
    after = min(e.fraction for e in events if e.stage == "hashing")
    assert before <= min(evaluating) and max(evaluating) <= after
    assert after - before > 0.2  # evaluation is weighed by its cost, not squeezed into the last percent
    plan = result.settings["memory_plan"]
    assert result.settings["device"] == "cpu" and plan["mode"] == "sequential" and "host memory" in plan["summary"]
    # no "checking" stage without a vLLM environment, and the results say so
    assert result.settings["vllm_check"] == {
        "ran": False,
        "reason": "This worker has no vLLM environment (COMPRESSOR_VLLM_PYTHON is not set to one).",
    }
    card = (result.output_dir / "README.md").read_text()
    assert "**Compressed on:** cpu" in card


def test_the_cards_reproduce_snippet_runs_with_llm_compressor_alone(tiny_model_dir, gptq_run, tmp_path):
    """The card's Creation code, run in a clean folder where the service's packages are not imported,
    gives the same quantized weights as the job."""
    from safetensors.torch import load_file

    result, _ = gptq_run
    card = (result.output_dir / "README.md").read_text()
    snippet = re.search(r"To reproduce it.*?```python\n(.*?)```", card, re.S).group(1)
    assert "engine" not in snippet
    (tmp_path / tiny_model_dir.name).symlink_to(tiny_model_dir)  # the card names the base model by its name
    shutil.copy(result.output_dir / "recipe.yaml", tmp_path / "recipe.yaml")
    check = "\nimport sys\nassert not any(name.split('.')[0] in ('engine', 'jobs') for name in sys.modules)\n"
    (tmp_path / "reproduce.py").write_text(snippet + check)
    run = subprocess.run(
        [sys.executable, "-I", "reproduce.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ours, theirs = (
        load_file(result.output_dir / "model.safetensors"),
        load_file(tmp_path / "compressed/model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_existing_output_folder_is_never_overwritten(tiny_model_dir, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(EngineError, match="already exists"):
        compress(CompressionSpec(model=str(tiny_model_dir), preset="fp8-dynamic"), out)
    assert (out / "keep.txt").read_text() == "precious"


def test_cancel_stops_the_run_and_leaves_no_output(tiny_model_dir, tmp_path):
    calls = iter(range(100))

    def cancel_after_loading():
        return next(calls) >= 2

    spec = CompressionSpec(
        model=str(tiny_model_dir),
        preset="int8-w8a8-gptq",
        calibration=CalibrationSpec(samples=4, max_seq_len=32),
    )
    with pytest.raises(CancelledError):
        compress(spec, tmp_path / "ckpt", should_cancel=cancel_after_loading)
    assert list(tmp_path.iterdir()) == []


# The built-in model (269 MB in bf16) on a worker capped to 700 MB of host memory: holding it whole with the
# run's own needs does not fit, disk offload does (about a third of the weights wait on disk).
SHORT_OF_MEMORY = WorkerCaps(host_ram_mb=700)


@pytest.fixture(scope="module")
def offloaded_run(builtin_model, tmp_path_factory):
    """fp8-dynamic on the built-in model under SHORT_OF_MEMORY, with a short evaluation; also how the
    evaluation loaded each model (a spy: the loading itself is real)."""
    loaded = []
    real_load = evaluation._load

    def load(path, placement, stack):
        model, tokenizer = real_load(path, placement, stack)
        on_disk = sum(type(m._parameters).__name__ == "DiskCache" for m in model.modules())
        loaded.append({"path": path, "mode": placement.mode, "modules_on_disk": on_disk})
        return model, tokenizer

    spec = CompressionSpec(
        preset="fp8-dynamic", calibration=CalibrationSpec(kind="none"), evaluation=EvaluationSpec(limit=2)
    )
    out = tmp_path_factory.mktemp("offloaded") / "ckpt"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPRESSOR_EVAL_CACHE", str(tmp_path_factory.mktemp("eval-cache")))
        patch.setattr(evaluation, "_load", load)
        result = compress(spec, out, caps=SHORT_OF_MEMORY)
    return result, loaded


def _weights(folder):
    from safetensors.torch import load_file

    return {name: tensor for shard in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(shard).items()}


def test_a_worker_short_of_host_memory_compresses_with_disk_offload_to_a_complete_checkpoint(offloaded_run, tmp_path):
    result, _ = offloaded_run
    out = result.output_dir
    # The plan chose disk offload, with its figures, in results.json and on the card
    plan = json.loads((out / "results.json").read_text())["settings"]["memory_plan"]
    assert plan["mode"] == "disk_offload" and plan["figures"]["host_ram"]["available"] == 700_000_000
    assert plan["figures"]["host_ram"]["capped"] is True and 0 < plan["host_weights_bytes"] < 269_000_000
    assert plan["offloaded_bytes"] + plan["host_weights_bytes"] > 268_000_000
    card = (out / "README.md").read_text()
    assert "Memory plan, disk offload: host memory" in card and "700.0 MB available (capped)" in card
    # A complete checkpoint, its offload folder gone
    assert verify_manifest(out) == []
    assert not [p for p in out.parent.rglob("*") if ".offload-" in p.name]
    # The same weights as a run that holds the whole model in memory
    plain = compress(CompressionSpec(preset="fp8-dynamic", calibration=CalibrationSpec(kind="none")), tmp_path / "c")
    assert plain.settings["memory_plan"]["mode"] == "sequential"
    ours, theirs = _weights(out), _weights(plain.output_dir)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_evaluation_follows_the_plan_and_loads_both_models_with_disk_offload(offloaded_run, builtin_model):
    result, loaded = offloaded_run
    assert [entry["mode"] for entry in loaded] == ["disk_offload", "disk_offload"]
    assert loaded[0]["path"] == builtin_model and all(entry["modules_on_disk"] > 0 for entry in loaded)
    perplexity = next(m for m in result.evaluation["metrics"] if m["name"] == "perplexity")
    assert 10 < perplexity["baseline"] < 30 and 95 < perplexity["recovery"] <= 100.5


def test_a_worker_without_the_memory_or_disk_for_a_job_refuses_it_with_the_figures(tiny_model_dir, tmp_path):
    spec = CompressionSpec(model=str(tiny_model_dir), preset="fp8-dynamic")
    with pytest.raises(PreflightError) as refused:
        compress(spec, tmp_path / "ckpt", caps=WorkerCaps(host_ram_mb=100))
    assert refused.value.field == "model"
    message = refused.value.message
    assert "3.2 M parameters (6.5 MB in bfloat16)" in message and "100.0 MB available" in message
    assert "Host memory: 508.1 MB needed to hold the whole model, at least 510.2 MB with disk offload" in message

    with pytest.raises(PreflightError, match=r"Not enough free disk space .* 50\.0 MB are free"):
        compress(spec, tmp_path / "ckpt", caps=WorkerCaps(disk_mb=50))
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_a_failed_vllm_check_is_reported_by_its_last_line_without_server_folders(tmp_path):
    from engine.stages import vllm_failure_reason

    staging = tmp_path / "jobs" / "7" / ".checkpoint.partial-x"
    message = (
        "The vLLM process failed (exit 1): Traceback (most recent call last):\n"
        '  File "/opt/vllm/lib/python3.12/site-packages/vllm/config.py", line 12, in load\n'
        f"ValueError: Unknown quantization scheme in {staging}/config.json (see /opt/vllm/lib/x.py)\n"
    )
    reason = vllm_failure_reason(message, staging)
    assert reason == "ValueError: Unknown quantization scheme in config.json (see …/x.py)"
    assert str(tmp_path) not in reason and "/opt/" not in reason


def test_a_vllm_argument_refused_by_pydantic_is_reported_by_the_reason_not_the_documentation_link(tmp_path):
    from engine.stages import vllm_failure_reason

    message = (
        "The vLLM process failed (exit 1): pydantic_core._pydantic_core.ValidationError: 1 validation error\n"
        "tensor_parallel_size\n"
        "  Input should be greater than or equal to 1 [type=greater_than_equal, input_value=0, input_type=int]\n"
        "    For further information visit https://errors.pydantic.dev/2.14/v/greater_than_equal\n"
    )
    reason = vllm_failure_reason(message, tmp_path / "staging")
    assert (
        reason == "Input should be greater than or equal to 1 [type=greater_than_equal, input_value=0, input_type=int]"
    )
