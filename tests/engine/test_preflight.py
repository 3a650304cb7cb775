import json

import pytest

from engine.errors import PreflightError
from engine.preflight import preflight
from engine.spec import CalibrationSpec, CompressionSpec


def spec_for(model, **fields):
    return CompressionSpec(model=str(model), **fields)


def test_missing_model_folder_is_refused(tmp_path):
    with pytest.raises(PreflightError, match="does not exist|neither a local folder") as info:
        preflight(spec_for(tmp_path / "no-such-model", preset="fp8-dynamic"))
    assert info.value.field == "model"


def test_pickle_only_model_is_refused_unless_allowed(tiny_model_copy):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_copy)
    (tiny_model_copy / "model.safetensors").unlink()
    torch.save(model.state_dict(), tiny_model_copy / "pytorch_model.bin")
    with pytest.raises(PreflightError, match="only pickle weights .*pytorch_model.bin"):
        preflight(spec_for(tiny_model_copy, preset="fp8-dynamic"))
    assert preflight(spec_for(tiny_model_copy, preset="fp8-dynamic", allow_pickle=True)).num_parameters > 0


def test_remote_code_is_refused_unless_allowed(tiny_model_copy):
    config = json.loads((tiny_model_copy / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (tiny_model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(PreflightError, match="trust_remote_code"):
        preflight(spec_for(tiny_model_copy, preset="fp8-dynamic"))


def test_non_causal_lm_is_refused(tiny_model_copy):
    config = json.loads((tiny_model_copy / "config.json").read_text())
    config.update(model_type="bert", architectures=["BertModel"])
    (tiny_model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(PreflightError, match="not a causal language model"):
        preflight(spec_for(tiny_model_copy, preset="fp8-dynamic"))


def test_non_divisible_group_size_names_the_layers(builtin_dir):
    # The built-in model's hidden size 576 is not divisible by 128; its MLP width 1536 is.
    with pytest.raises(PreflightError) as info:
        preflight(CompressionSpec(preset="w4a16-gptq"))
    message = str(info.value)
    assert "Group size 128" in message and "180 layers" in message
    # ...with the width 128 does not divide, and the option in the words the form shows
    assert "input width (576)" in message
    assert "“Leave layers a grouped scheme cannot divide unquantized”" in message
    assert "model.layers.*.self_attn.q_proj" in message and "down_proj" not in message
    assert info.value.field == "preset"


def test_indivisible_layers_can_be_left_unquantized(builtin_dir):
    report = preflight(CompressionSpec(preset="w4a16-gptq", ignore_indivisible=True))
    assert r"re:^model\.layers\.\d+\.self_attn\.q_proj$" in report.extra_ignore
    assert not any("down_proj" in pattern for pattern in report.extra_ignore)
    assert "down_proj" not in report.recipe_yaml and "q_proj" in report.recipe_yaml


def test_calibrated_preset_without_data_is_refused(tiny_model_dir):
    with pytest.raises(PreflightError, match="needs calibration data") as info:
        preflight(spec_for(tiny_model_dir, preset="fp8-static", calibration=CalibrationSpec(kind="none")))
    assert info.value.field == "calibration"


def test_too_few_calibration_rows_is_refused(tiny_model_dir, tmp_path):
    path = tmp_path / "cal.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n')
    calibration = CalibrationSpec(kind="jsonl", path=str(path), samples=8)
    with pytest.raises(PreflightError, match="has 2 usable rows but 8 samples"):
        preflight(spec_for(tiny_model_dir, preset="int8-w8a8-gptq", calibration=calibration))


def test_preset_and_recipe_together_are_refused(tiny_model_dir):
    with pytest.raises(PreflightError, match="either a preset or a custom recipe"):
        preflight(spec_for(tiny_model_dir, preset="fp8-dynamic", recipe_yaml="a: b"))


def test_hub_model_without_a_reachable_hub_is_a_clear_message_not_a_hang(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what this machine is anyway; set so the test is deterministic
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    with pytest.raises(PreflightError, match="hub cannot be reached.*built-in model") as info:
        preflight(CompressionSpec(model="some-org/some-model", revision="v1", preset="fp8-dynamic"))
    assert info.value.field == "model"
