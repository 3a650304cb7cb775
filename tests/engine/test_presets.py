import subprocess
import sys

import pytest

from engine.errors import EngineError
from engine.presets import (
    PRESETS,
    get_preset,
    recipe_group_sizes,
    recipe_needs_calibration,
    validate_recipe_yaml,
)

SEED_PRESETS = {"fp8-static", "fp8-dynamic", "sparse24-fp8-dynamic", "int8-w8a8-gptq"}


def test_every_named_preset_exists_with_a_description():
    assert SEED_PRESETS | {"w4a16-gptq", "w8a16-gptq", "smoothquant-int8-w8a8", "nvfp4"} <= set(PRESETS)
    for preset in PRESETS.values():
        assert preset.description and len(preset.description) < 140


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_recipe_is_accepted_by_llm_compressor_and_declares_calibration_truthfully(name):
    preset = PRESETS[name]
    recipe = validate_recipe_yaml(preset.recipe_yaml())
    # The preset's own claim must agree with llm-compressor's modifiers.
    assert recipe_needs_calibration(recipe) is preset.needs_calibration
    assert "lm_head" in recipe


def test_seed_presets_build_the_seed_cards_schemes():
    assert "scheme: FP8\n" in PRESETS["fp8-static"].recipe_yaml()
    assert "dampening_frac: 0.01" in PRESETS["int8-w8a8-gptq"].recipe_yaml()
    sparse = PRESETS["sparse24-fp8-dynamic"].recipe_yaml()
    assert sparse.index("SparseGPTModifier") < sparse.index("QuantizationModifier")
    assert "2:4" in sparse and "observer: mse" in sparse


def test_grouped_presets_report_their_group_size():
    assert recipe_group_sizes(PRESETS["w4a16-gptq"].recipe_yaml()) == {128}
    assert recipe_group_sizes(PRESETS["nvfp4"].recipe_yaml()) == {16}
    assert recipe_group_sizes(PRESETS["fp8-dynamic"].recipe_yaml()) == set()


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(EngineError, match="Unknown preset 'fp3'.*fp8-dynamic") as info:
        get_preset("fp3")
    assert info.value.field == "preset"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stage: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "YAML mapping"),
        ("quant_stage:\n  modifiers:\n    QuantizationModifier: {scheme: FP8}\n", "names no modifiers"),
        (
            "quant_stage:\n  quant_modifiers:\n    NoSuchModifier: {scheme: FP8}\n",
            "llm-compressor has no modifier 'NoSuchModifier'",
        ),
    ],
)
def test_bad_custom_recipe_is_a_clear_error(text, message):
    with pytest.raises(EngineError, match=message) as info:
        validate_recipe_yaml(text)
    assert info.value.field == "recipe"


def test_engine_imports_without_django():
    code = (
        "import sys, engine.runner, engine.cli, engine.preflight, engine.calibration, engine.models;"
        "assert not any(m == 'django' or m.startswith('django.') for m in sys.modules), 'django imported'"
    )
    env_free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": ""})
    assert env_free.returncode == 0, env_free.stderr[-2000:]
