"""Real runs on the built-in model: the checkpoints reload with transformers and generate text."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.artifacts import verify_manifest
from engine.runner import compress
from engine.spec import CalibrationSpec, CompressionSpec, EvaluationSpec


def reload_and_generate(path) -> str:
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.bfloat16
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_builtin_model_compresses_evaluates_reloads_and_generates(builtin_dir, tmp_path, monkeypatch):
    """int8-w8a8-gptq then fp8-dynamic with the offline suite: the second job reuses the baseline."""
    monkeypatch.setenv("COMPRESSOR_EVAL_CACHE", str(tmp_path / "eval-cache"))
    expected = [("int8-w8a8-gptq", "int-quantized", False), ("fp8-dynamic", "float-quantized", True)]
    for preset, fmt, cache_hit in expected:
        spec = CompressionSpec(
            preset=preset, calibration=CalibrationSpec(samples=16, max_seq_len=128), evaluation=EvaluationSpec()
        )
        result = compress(spec, tmp_path / preset)
        out = result.output_dir
        quant = json.loads((out / "config.json").read_text())["quantization_config"]
        assert quant["quant_method"] == "compressed-tensors" and quant["format"] == fmt
        assert "lm_head" in quant["ignore"]
        assert verify_manifest(out) == []
        assert result.compression_ratio > 1.3

        results = json.loads((out / "results.json").read_text())
        evaluation = results["evaluation"]
        assert evaluation["baseline_cache_hit"] is cache_hit
        metrics = {m["name"]: m for m in evaluation["metrics"]}
        ppl = metrics["perplexity"]
        assert ppl["recovery"] == pytest.approx(100 * ppl["baseline"] / ppl["compressed"])
        assert ppl["recovery"] > 90 and metrics["top1_agreement"]["compressed"] > 80

        card = (out / "README.md").read_text()
        for heading in ("## Model Overview", "### Model Optimizations", "## Creation", "## Deployment"):
            assert heading in card
        assert f"{ppl['compressed']:.2f}" in card and f"{ppl['recovery']:.2f} %" in card
        if preset == "int8-w8a8-gptq":  # 7 linear modules in each of the 30 decoder layers, by their real names
            modules = [entry["module"] for entry in results["layer_errors"]]
            assert len(modules) == 210 and "model.layers.29.mlp.down_proj" in modules

        text = reload_and_generate(out)
        assert len([word for word in text.split() if word.isalpha()]) >= 3, text


@pytest.mark.slow
def test_cli_compresses_and_prints_where_and_how_much(builtin_dir, tmp_path):
    out = tmp_path / "cli-out"
    run = subprocess.run(
        [sys.executable, "manage.py", "compress", "--preset", "fp8-dynamic", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"Checkpoint: {out}" in run.stdout
    assert "compression ratio" in run.stdout and (out / "manifest.json").is_file()


def test_cli_obeys_caps_on_the_machine_and_says_why_a_model_does_not_fit(tiny_model_dir, tmp_path):
    out = tmp_path / "cli-out"
    command = [sys.executable, "manage.py", "compress", "--model", str(tiny_model_dir), "--preset", "fp8-dynamic"]
    run = subprocess.run(
        [*command, "--out", str(out), "--host-ram-mb", "100"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 2 and "This model does not fit on this worker" in run.stderr, run.stderr[-3000:]
    assert "100.0 MB available" in run.stderr and not out.exists()


def test_cli_lists_presets_one_a_line():
    run = subprocess.run(
        [sys.executable, "manage.py", "compress", "--list-presets"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0 and len(lines) == 8
    assert lines[0].startswith("fp8-static ") and "seed 002" in lines[0]


def test_cli_bad_input_is_a_message_not_a_traceback(tmp_path):
    run = subprocess.run(
        [sys.executable, "manage.py", "compress", "--preset", "nope", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "error: Unknown preset 'nope'" in run.stderr and "Traceback" not in run.stderr
