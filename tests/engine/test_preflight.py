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


@pytest.fixture(scope="module")
def width_80_model(random_llama):
    """A random Llama of hidden size 80 (MLP 160): 128 and 64 divide none of its layers, 32 only down_proj."""
    return random_llama(
        "width-80",
        hidden_size=80,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )


def test_a_grouped_preset_takes_the_largest_group_size_that_divides_every_layer(builtin_dir):
    # Given the built-in model: 128 divides its MLP width 1536 but not its hidden size 576; 64 divides both
    report = preflight(CompressionSpec(preset="w4a16-gptq"))

    # Then w4a16-gptq runs in groups of 64 and quantizes every Linear layer but lm_head
    assert "group_size: 64" in report.recipe_yaml and "scheme" not in report.recipe_yaml
    assert report.extra_ignore == []


def test_non_divisible_group_size_names_the_layers(width_80_model):
    with pytest.raises(PreflightError) as info:
        preflight(spec_for(width_80_model, preset="w4a16-gptq"))
    message = str(info.value)
    assert "Group size 128" in message and "14 layers" in message and "64 and 32 do not fit every layer" in message
    # ...with the width 128 does not divide, and the option in the words the form shows
    assert "input width (80, 160)" in message
    assert "“Leave layers a grouped scheme cannot divide unquantized”" in message
    assert "model.layers.*.self_attn.q_proj" in message and "down_proj" in message
    assert info.value.field == "preset"


def test_indivisible_layers_can_be_left_unquantized(width_80_model):
    # In groups of 32, which leave out the fewest layers (all but down_proj)
    report = preflight(spec_for(width_80_model, preset="w4a16-gptq", ignore_indivisible=True))
    assert r"re:^model\.layers\.\d+\.self_attn\.q_proj$" in report.extra_ignore
    assert not any("down_proj" in pattern for pattern in report.extra_ignore)
    assert "group_size: 32" in report.recipe_yaml and "q_proj" in report.recipe_yaml


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
