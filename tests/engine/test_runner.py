import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from engine.artifacts import verify_manifest
from engine.errors import CancelledError, EngineError
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
    assert result.settings["device"] == "cpu" and "host memory" in result.settings["memory_plan"]
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
