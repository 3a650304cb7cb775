"""Resume (engine.layer_resume): a GPTQ run SIGKILLed after N of M layers restarts from them, and its checkpoint is
the one an uninterrupted run writes, bit for bit.

The interrupted run is a real child process: its progress callback stops it at the start of layer N (the
layers before are compressed and stored by then), and the test kills it with SIGKILL once the store's index
names them, so nothing in the child gets a chance to tidy up.
"""

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

from engine.layer_resume import INDEX_NAME, LayerStore
from engine.presets import PRESETS, recipe_calibrating_modifiers
from engine.runner import compress
from engine.spec import CalibrationSpec, CompressionSpec, EvaluationSpec
from tests.support import wait_until

LAYERS = 4
KILLED_AT = 2  # the child is killed while layer 2 (0-based) calibrates: layers 0 and 1 are stored

# The interrupted run: compress, and stop for good when layer KILLED_AT begins (the parent SIGKILLs it then).
_CHILD = """
import sys, time
from pathlib import Path
from engine.runner import compress
from engine.spec import CompressionSpec

spec = CompressionSpec.from_dict(__import__("json").loads(sys.argv[1]))
stop_at = sys.argv[4]

def progress(event):
    if event.message == stop_at:
        print("stopped at", stop_at, flush=True)
        time.sleep(3600)

compress(spec, Path(sys.argv[2]), resume_dir=Path(sys.argv[3]), progress=progress)
"""


@pytest.fixture(scope="module")
def four_layer_model(tiny_model_with_layers) -> Path:
    return tiny_model_with_layers(LAYERS)


@pytest.fixture(scope="module")
def gptq_spec(four_layer_model) -> CompressionSpec:
    return CompressionSpec(
        model=str(four_layer_model),
        preset="int8-w8a8-gptq",
        calibration=CalibrationSpec(samples=4, max_seq_len=32),
        evaluation=EvaluationSpec(limit=2),
    )


@pytest.fixture(autouse=True)
def eval_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_EVAL_CACHE", str(tmp_path / "eval-cache"))


def _run_killed_at_layer(spec: CompressionSpec, out: Path, resume_dir: Path, layer: int) -> dict:
    """Run the job in a child process, SIGKILL it once layers 0..layer-1 are stored; return the index."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    stop_at = f"Layer {layer + 1} of {LAYERS}"  # the progress line of layer `layer` (0-based)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(spec.to_dict()), str(out), str(resume_dir), stop_at],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def stored() -> dict | None:
            if child.poll() is not None:
                raise AssertionError(f"the child ended early ({child.returncode}):\n{child.stdout.read()[-3000:]}")
            index = resume_dir / INDEX_NAME
            done = json.loads(index.read_text()) if index.is_file() else None
            return done if done and len(done["done"]) >= layer else None

        index = wait_until(stored, timeout=300, what=f"the child to store layers 0-{layer - 1}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    return index


def _perplexity(result) -> dict:
    return next(m for m in result.evaluation["metrics"] if m["name"] == "perplexity")


def test_a_gptq_run_killed_after_n_layers_resumes_from_them_to_the_uninterrupted_checkpoint(gptq_spec, tmp_path):
    # Given the checkpoint of an uninterrupted run (which removes its layer store once published)
    uninterrupted = compress(gptq_spec, tmp_path / "uninterrupted", resume_dir=tmp_path / "resume-uninterrupted")
    assert not (tmp_path / "resume-uninterrupted").exists()

    # When the same job runs in a child process that is SIGKILLed while layer 2 of 4 calibrates
    resume_dir = tmp_path / "resume"
    index = _run_killed_at_layer(gptq_spec, tmp_path / "killed", resume_dir, KILLED_AT)
    assert index["done"] == [0, 1] and index["total"] == LAYERS
    assert not (tmp_path / "killed").exists(), "a killed run publishes nothing"

    # ...and runs again with the store the killed run left
    events = []
    resumed = compress(gptq_spec, tmp_path / "resumed", resume_dir=resume_dir, progress=events.append)

    # Then it says where it resumed, and compresses only the layers that were not done
    lines = [event.message for event in events if event.message] + [e.log_line for e in events if e.log_line]
    assert "Resuming from layer 2 of 4 (layers 0–1 restored from the interrupted run)" in lines
    quantized = [line for line in lines if "Quantizing" in line]
    assert quantized and not any("model.layers.0." in line or "model.layers.1." in line for line in quantized)
    # ...the per-layer errors of layers 0 and 1 are those the killed run measured, in the uninterrupted order
    assert resumed.layer_errors == uninterrupted.layer_errors
    # ...its checkpoint equals the uninterrupted one tensor by tensor, bit for bit, with the same quantization
    # config (every layer, as the recipe says) and the same perplexity
    ours, theirs = (
        load_file(resumed.output_dir / "model.safetensors"),
        load_file(uninterrupted.output_dir / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys() and any(key.endswith("weight_scale") for key in ours)
    different = [key for key in ours if not torch.equal(ours[key], theirs[key])]
    assert different == []
    config = [
        json.loads((r.output_dir / "config.json").read_text())["quantization_config"] for r in (resumed, uninterrupted)
    ]
    assert config[0] == config[1]
    assert _perplexity(resumed) == _perplexity(uninterrupted)
    # ...and the store is gone once the checkpoint is published
    assert not resume_dir.exists()


def test_a_static_fp8_run_killed_after_n_layers_resumes_to_the_uninterrupted_checkpoint(four_layer_model, tmp_path):
    # Given static FP8, whose observers calibrate each layer's activation scales (no Hessians, no GPTQ)
    calibration = CalibrationSpec(samples=4, max_seq_len=32)
    spec = CompressionSpec(model=str(four_layer_model), preset="fp8-static", calibration=calibration)
    uninterrupted = compress(spec, tmp_path / "uninterrupted")

    # When a run is SIGKILLed while layer 2 of 4 calibrates, and the job runs again with what it stored
    assert _run_killed_at_layer(spec, tmp_path / "killed", tmp_path / "resume", KILLED_AT)["done"] == [0, 1]
    resumed = compress(spec, tmp_path / "resumed", resume_dir=tmp_path / "resume")

    # Then the checkpoints are equal bit for bit, the restored layers' activation scales included
    ours, theirs = (load_file(run.output_dir / "model.safetensors") for run in (resumed, uninterrupted))
    assert ours.keys() == theirs.keys() and "model.layers.0.self_attn.q_proj.input_scale" in ours
    assert [key for key in ours if not torch.equal(ours[key], theirs[key])] == []


def test_a_store_of_other_work_or_with_a_half_written_layer_is_not_used(tmp_path):
    # Given a store whose index names layers 0 and 1, one of whose files is gone, and a temporary file that a
    # kill in the middle of a write left behind
    folder = tmp_path / "resume"
    store = LayerStore(folder, "fingerprint-a", total=3)
    store.save(0, {"model.layers.0.w": torch.ones(2)}, [{"module": "model.layers.0.w", "error": 0.5}])
    store.save(1, {"model.layers.1.w": torch.ones(2)}, [])
    (folder / "layer-00001.safetensors").unlink()
    (folder / ".layer-00002.safetensors.k1ll3d").write_bytes(b"half")

    # When the same work opens it, then it resumes after layer 0 only, with layer 0's tensors as saved
    reopened = LayerStore(folder, "fingerprint-a", total=3)
    assert reopened.done == [0] and reopened.done_prefix() == 1
    assert sorted(path.name for path in folder.iterdir()) == [INDEX_NAME, "layer-00000.safetensors"]
    tensors, errors = reopened.load(0)
    assert torch.equal(tensors["model.layers.0.w"], torch.ones(2))
    assert errors == [{"module": "model.layers.0.w", "error": 0.5}]

    # When other work (another recipe, model, calibration data or library version) opens it
    other = LayerStore(folder, "fingerprint-b", total=3)

    # Then nothing of it is used, and its files are gone
    assert other.done == [] and other.done_prefix() == 0 and not folder.exists()


def test_recipes_that_calibrate_in_two_passes_are_not_resumed(four_layer_model, tmp_path):
    # Given SmoothQuant then GPTQ, which llm-compressor runs as two passes over the calibration data
    assert recipe_calibrating_modifiers(PRESETS["smoothquant-int8-w8a8"].recipe_yaml()) == [
        "SmoothQuantModifier",
        "GPTQModifier",
    ]
    assert recipe_calibrating_modifiers(PRESETS["int8-w8a8-gptq"].recipe_yaml()) == ["GPTQModifier"]

    # When such a job runs with a resume folder, then it stores no layer (it would start over after a kill)
    events = []
    spec = CompressionSpec(
        model=str(four_layer_model),
        preset="smoothquant-int8-w8a8",
        calibration=CalibrationSpec(samples=2, max_seq_len=16),
    )

    def watch(event) -> None:
        events.append(event)
        assert not (tmp_path / "resume").exists(), "no layer store for a two-pass recipe"

    compress(spec, tmp_path / "ckpt", resume_dir=tmp_path / "resume", progress=watch)
    assert not any("Resuming" in (event.message or "") for event in events)
