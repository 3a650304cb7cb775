import subprocess
import sys
import time

import pytest
import yaml

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
        ("quant_stage:\n  modifiers:\n    QuantizationModifier: {scheme: FP8}\n", "names no modifier;"),
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
        "import sys, engine.runner, engine.cli, engine.preflight, engine.calibration, engine.model_sources;"
        "assert not any(m == 'django' or m.startswith('django.') for m in sys.modules), 'django imported'"
    )
    env_free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": ""})
    assert env_free.returncode == 0, env_free.stderr[-2000:]


# --- the submission check's argument rules against llm-compressor's own pydantic models --------------------------

# One YAML value of each kind the submission check tells apart (engine.presets._value_kinds).
SAMPLES = [None, True, 3, 0.5, "Linear", ["Linear"], [0.5], [["a", "b"]], [{}], [1, "a"], {}]


# Refusals of a value's content, not of its type: a choice it lacks, a field missing inside a mapping, a validator
# of llm-compressor's own ("randomize is not supported right now"). The worker's validate_recipe_yaml (with
# llm-compressor) fails such a job in its first stage; the submission check judges types.
CONTENT = {"value_error", "assertion_error", "literal_error", "enum", "missing"}


def _llm_compressor_refuses_the_type(modifier, arg: str, value) -> bool:
    """Whether the modifier's pydantic model refuses `value` for `arg` by its type (other fields do not count)."""
    from pydantic import ValidationError

    try:
        modifier.model_validate({arg: value})
    except ValidationError as exc:
        return any(error["loc"][:1] == (arg,) and error["type"] not in CONTENT for error in exc.errors())
    except Exception:  # a validator of its own (NotImplementedError, str.lower on a bool)
        return False
    return False


def test_every_argument_type_the_submission_check_lets_through_is_one_llm_compressor_takes():
    """The web process cannot import llm-compressor (torch); its rules are read from llm-compressor's
    annotations in a child process (library_facts). Here, with llm-compressor imported, each rule is put to
    the model itself: a value whose type the check passes must not be refused for its type by the model, so
    that a library upgrade that changes a type fails here rather than in a queued job."""
    from llmcompressor.modifiers import ModifierFactory

    from engine.presets import _value_kinds, library_facts

    ModifierFactory.refresh()
    registry = {**ModifierFactory._experimental_registry, **ModifierFactory._main_registry}
    facts = library_facts()
    judged, wrong = 0, []
    for name, arguments in facts["arguments"].items():
        for arg, kinds in arguments.items():
            if kinds is None:
                continue  # not judged from the text (torch types, callables): llm-compressor's, in the worker
            choices = [kind[1:] for kind in kinds if kind.startswith("=")]
            for value in [*SAMPLES, *choices]:
                ours = bool(_value_kinds(value) & set(kinds))
                judged += 1
                if ours and _llm_compressor_refuses_the_type(registry[name], arg, value):
                    wrong.append(f"{name}.{arg}={value!r}")
    assert judged > 1000
    assert not wrong, f"the check lets through what llm-compressor refuses: {wrong}"


@pytest.mark.parametrize("scheme", ["W4A16", "fp8_dynamic", "../../etc/passwd", {"W8A16": ["Linear"]}, {"NOPE": "x"}])
def test_a_scheme_is_judged_as_llm_compressor_judges_it(scheme):
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from pydantic import ValidationError

    from engine.presets import check_recipe_text

    recipe = yaml.safe_dump({"s_stage": {"m_modifiers": {"QuantizationModifier": {"scheme": scheme}}}})
    try:
        QuantizationModifier(scheme=scheme)
        theirs = True
    except ValidationError:
        theirs = False
    try:
        check_recipe_text(recipe)
        ours = True
    except EngineError:
        ours = False
    assert ours is theirs


# --- 're:' patterns --------------------------------------------------------------------------------------------


def test_a_pattern_rewritten_for_the_worker_matches_exactly_the_names_re2_matched():
    import random
    import re

    from engine.presets import _exact_pattern, compiled_pattern

    rng = random.Random(0)
    names = [f"model.layers.{i}.{part}" for i in range(40) for part in ("mlp.up_proj", "mlp.down_proj", "self_attn.o")]
    names += ["lm_head", "model", "", "model.layers.1", "model.layers.10.mlp"]
    for pattern in [r".*down_proj$", r"model\.layers\.1", r".*\.(1|3)\d?\.", "", r"([\w.]+)+!", rng.choice(names)]:
        matched = [name for name in names if compiled_pattern(pattern).match(name)]
        exact = _exact_pattern(matched or ["re:(?!)"])
        # Python's re, given the rewritten pattern, says yes to exactly those names, and at once
        started = time.perf_counter()
        assert [name for name in names if re.match(exact, name)] == matched, pattern
        assert time.perf_counter() - started < 0.1


def test_the_recipe_given_to_oneshot_names_layers_instead_of_patterns():
    from engine.presets import linear_time_recipe

    names = ["", "model", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "lm_head"]
    recipe = yaml.safe_dump(
        {
            "q_stage": {
                "q_modifiers": {
                    "GPTQModifier": {"scheme": "W8A16", "targets": "re:.*_proj$", "ignore": ["lm_head", "re:(a+)+$"]},
                    "SmoothQuantModifier": {"mappings": [[["re:.*up_proj"], "re:.*down"]]},
                }
            }
        }
    )

    modifiers = yaml.safe_load(linear_time_recipe(recipe, names))["q_stage"]["q_modifiers"]

    assert modifiers["GPTQModifier"]["targets"] == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert modifiers["GPTQModifier"]["ignore"] == ["lm_head", "re:(?!)"]
    [[balance], smooth] = modifiers["SmoothQuantModifier"]["mappings"][0]
    assert balance == r"re:model\.layers\.0\.mlp\.up_proj\Z" and smooth == r"re:model\.layers\.0\.mlp\.down_proj\Z"
