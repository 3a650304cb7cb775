"""Which layers a recipe quantizes, as compressed-tensors decides it: the group-size check honours a custom
recipe's own targets and ignore (exact names, 're:' patterns, class names), and its advice is the same on the
preset and the recipe routes. The built-in model: hidden size 576 (128 does not divide it, 64 does), MLP 1536."""

from __future__ import annotations

import pytest

from engine.errors import PreflightError
from engine.preflight import preflight
from engine.presets import PRESETS, preset_for_recipe
from engine.spec import CalibrationSpec, CompressionSpec
from engine.submission import IGNORE_INDIVISIBLE_LABEL, check_submission

DATA = CalibrationSpec(samples=8)


def gptq_w4a16(**args: str) -> str:
    """A GPTQ W4A16 recipe (groups of 128) as llm-compressor's examples write it, with these arguments."""
    lines = "".join(f"      {key}: {value}\n" for key, value in args.items())
    return f"quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      scheme: W4A16\n{lines}"


def test_a_recipe_that_ignores_what_128_cannot_divide_passes_as_pasted(builtin_model):
    # Given a recipe that leaves out the 576-wide layers by llm-compressor's 're:' patterns and lm_head by name
    recipe = gptq_w4a16(
        targets="[Linear]", ignore="[lm_head, 're:.*self_attn\\..*', 're:.*mlp\\.gate_proj$', 're:.*up_proj$']"
    )

    # When it is checked, without the option that leaves layers out
    checked = check_submission(CompressionSpec(recipe_yaml=recipe, calibration=DATA))

    # Then it passes, recorded as written, and what it leaves unquantized is what it says
    assert checked.recipe_yaml == recipe
    assert checked.extra_ignore == ["re:.*mlp\\.gate_proj$", "re:.*self_attn\\..*", "re:.*up_proj$"]


def test_a_recipe_whose_targets_name_only_divisible_layers_passes(builtin_model):
    # Given a recipe that targets only the down_proj layers (1536 columns), by pattern and by exact name
    by_pattern = gptq_w4a16(targets="['re:.*down_proj$']")
    by_name = gptq_w4a16(targets="[model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj]")

    # Then both pass: the 576-wide layers are not the recipe's to quantize
    for recipe in (by_pattern, by_name):
        assert check_submission(CompressionSpec(recipe_yaml=recipe, calibration=DATA)).recipe_yaml == recipe


def test_the_recipe_route_says_what_to_write_in_the_recipe_and_never_offers_the_checkbox(builtin_model):
    recipe = gptq_w4a16(targets="[Linear]", ignore="[lm_head]")

    # With or without the option that leaves layers out, a custom recipe gets the same answer
    for ignore_indivisible in (False, True):
        spec = CompressionSpec(recipe_yaml=recipe, calibration=DATA, ignore_indivisible=ignore_indivisible)
        with pytest.raises(PreflightError) as info:
            check_submission(spec)
        message = str(info.value)
        # ...naming the layers, the patterns to paste into its ignore list, and the group size that fits
        assert message.startswith("Group size 128 does not divide the input width (576) of 180 layers")
        assert "Add them to the recipe's ignore list ('re:^model\\.layers\\.\\d+\\.mlp\\.gate_proj$'" in message
        assert "or give its weights groups of 64" in message
        assert IGNORE_INDIVISIBLE_LABEL not in message and "--ignore-indivisible" not in message
        assert info.value.field == "recipe"

    # ...and the patterns it names make the recipe pass when pasted
    patterns = message.split("ignore list (")[1].split(")")[0]
    fixed = gptq_w4a16(targets="[Linear]", ignore=f"[lm_head, {patterns}]")
    assert check_submission(CompressionSpec(recipe_yaml=fixed, calibration=DATA)).recipe_yaml == fixed


def test_a_recipe_that_quantizes_nothing_is_refused_with_a_sentence(builtin_model):
    # Given a recipe whose ignore names the targets' own class
    recipe = gptq_w4a16(targets="[Linear]", ignore="[Linear]")

    # Then it is refused before any worker loads the model
    with pytest.raises(PreflightError, match="The recipe would quantize nothing in this model") as info:
        check_submission(CompressionSpec(recipe_yaml=recipe, calibration=DATA))
    assert info.value.field == "recipe"


def test_the_worker_matches_targets_on_the_real_modules_class_names(tiny_model_dir):
    # Given the tiny Llama (hidden 64, MLP 192: 128 divides neither) and a recipe targeting the class Linear
    recipe = gptq_w4a16(targets="[Linear]", ignore="[lm_head]")

    # When the worker prepares the recipe recorded at submission (judged on the modules, not the header)
    spec = CompressionSpec(model=str(tiny_model_dir), recipe_yaml=recipe, resolved_recipe=recipe, calibration=DATA)
    with pytest.raises(PreflightError) as info:
        preflight(spec)

    # Then every Linear module but lm_head is named, with the group size that would fit
    assert "Group size 128 does not divide the input width (64, 192) of 14 layers" in str(info.value)
    assert "or give its weights groups of 64" in str(info.value) and info.value.field == "recipe"

    # ...and in groups of 64 it passes
    grouped = (
        "quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      ignore: [lm_head]\n      config_groups:\n"
        "        group_0:\n          targets: [Linear]\n"
        "          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 64}\n"
    )
    spec = CompressionSpec(model=str(tiny_model_dir), recipe_yaml=grouped, resolved_recipe=grouped, calibration=DATA)
    assert preflight(spec).extra_ignore == []


def test_the_group_size_chosen_for_the_model_is_what_the_pages_and_the_card_say(builtin_model):
    # Given w4a16-gptq recorded for the built-in model (groups of 64: 128 does not divide 576)
    recorded = check_submission(CompressionSpec(preset="w4a16-gptq", calibration=DATA)).recipe_yaml

    # Then the preset as the job ran it (the job page's and the card's words) says groups of 64
    summary = preset_for_recipe("w4a16-gptq", recorded).summary()
    assert summary["group_size"] == 64 and "groups of 64" in summary["description"]
    assert "per group of 64 columns" in summary["weight_quantization"]
    assert any(note.startswith("Groups of 64 on this model") for note in summary["notes"])
    # ...while the form, before a model is chosen, says which sizes it may take
    assert "(else groups of 64 or 32" in " ".join(PRESETS["w4a16-gptq"].needs())
