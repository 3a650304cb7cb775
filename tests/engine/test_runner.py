import json

import pytest

from engine.artifacts import verify_manifest
from engine.errors import CancelledError, EngineError
from engine.runner import compress
from engine.spec import CalibrationSpec, CompressionSpec


def test_tiny_model_compresses_into_a_verified_checkpoint(tiny_model_dir, tmp_path):
    events = []
    out = tmp_path / "ckpt"
    result = compress(CompressionSpec(model=str(tiny_model_dir), preset="fp8-dynamic"), out, progress=events.append)
    assert out.is_dir() and verify_manifest(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"model.safetensors", "config.json", "recipe.yaml", "results.json"} <= {f["path"] for f in manifest["files"]}
    assert result.size_after_bytes < result.size_before_bytes
    stages = [e.stage for e in events if e.log_line is None]
    assert stages[0] == "loading" and "saving" in stages and stages[-1] == "done"
    assert any(e.log_line for e in events)  # llm-compressor's own log lines reach the callback


def test_calibrated_run_reports_each_layer_and_its_error(tiny_model_dir, tmp_path):
    events = []
    spec = CompressionSpec(
        model=str(tiny_model_dir),
        preset="int8-w8a8-gptq",
        calibration=CalibrationSpec(samples=4, max_seq_len=32),
    )
    result = compress(spec, tmp_path / "ckpt", progress=events.append)
    layer_steps = [(e.step, e.total) for e in events if e.message.startswith("Layer")]
    assert layer_steps == [(1, 2), (2, 2)]
    assert result.layer_errors and all(entry["error"] >= 0 for entry in result.layer_errors)


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
