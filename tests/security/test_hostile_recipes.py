"""Custom recipes an attacker (or a careless paste) sends: each is a 400 naming the recipe, in words, before
anything is queued; never a 500, never a worker pinned by a pattern."""

from __future__ import annotations

import json
import time

import pytest

from jobs.models import Job

pytestmark = pytest.mark.django_db


def _recipe(modifier: str) -> str:
    return f"compression_stage:\n  compression_modifiers:\n    {modifier}\n"


# Values PyYAML's safe loader reads into something no modifier takes, or fails to read with a Python error.
UNREADABLE = [
    ("an integer of 5,000 digits", "a: " + "1" * 5000 + "\n", "cannot read as a number"),
    ("a sexagesimal float too large for a float", "a: 1" + ":59" * 3000 + ".5\n", "cannot read as a number"),
    ("binary data", _recipe("QuantizationModifier: {scheme: !!binary aGVsbG8=, targets: [Linear]}"), "!!binary"),
    ("a set", _recipe("QuantizationModifier: {scheme: W8A16, targets: !!set {Linear}}"), "!!set"),
    ("ordered pairs", _recipe("QuantizationModifier: {scheme: W8A16, targets: !!omap [x: 1]}"), "!!omap"),
    ("a date", _recipe("QuantizationModifier: {scheme: W8A16, targets: 2001-12-14}"), "a date"),
    ("an infinite float", _recipe("QuantizationModifier: {scheme: W8A16, start: 1.0e+999999}"), "inf"),
    ("a 19-digit integer", _recipe("QuantizationModifier: {scheme: W8A16, start: 9999999999999999999}"), "18 digits"),
    ("a key that is a number", "1: 2\n", "keys are names"),
]


@pytest.mark.parametrize(("name", "recipe", "expected"), UNREADABLE, ids=[case[0] for case in UNREADABLE])
def test_a_recipe_value_yaml_cannot_read_plainly_is_a_400_naming_the_recipe(api, name, recipe, expected):
    response = api.post("/api/v1/jobs/", {"recipe_yaml": recipe}, format="json")

    assert response.status_code == 400, (name, response.content)
    assert expected in json.dumps(response.json()["recipe_yaml"]), response.json()
    assert "sys.set_int_max_str_digits" not in response.content.decode()  # Python's hint is not the message
    assert not Job.objects.exists()


def test_the_form_answers_a_huge_integer_beside_the_recipe_field(user):
    from django.test import Client

    client = Client()
    client.force_login(user)
    form = {
        "model_source": "builtin",
        "builtin_model": "smollm2-135m-instruct",
        "preset": "custom",
        "recipe_yaml": "a: " + "1" * 5000 + "\n",
        "calibration_kind": "builtin",
        "calibration_split": "train",
        "calibration_column": "text",
        "calibration_samples": "8",
        "calibration_max_seq_len": "128",
        "priority": "5",
        "device_class": "cpu",
    }

    response = client.post("/jobs/new/", form)

    assert response.status_code == 400
    assert 'id="recipe_yaml-error"' in response.content.decode()
    assert "cannot read as a number" in response.content.decode()
    assert not Job.objects.exists()


# Recipes that parse but could never run: refused at submission by their structure, without llm-compressor.
NEVER_RUN = [
    ("no modifier at all", "a: 1e999999\n", "names no modifier"),
    ("a scheme that is a path", _recipe("QuantizationModifier: {scheme: ../../etc/passwd, targets: [Linear]}"), "etc"),
    ("targets that are a number", _recipe("QuantizationModifier: {scheme: W8A16, targets: 5}"), "targets is"),
    ("ignore that is a mapping", _recipe("GPTQModifier: {scheme: W8A16, ignore: {a: 1}}"), "ignore is"),
    ("a dampening that is a word", _recipe("GPTQModifier: {scheme: W8A16, dampening_frac: high}"), "dampening_frac"),
    ("a strength given as text", _recipe("SmoothQuantModifier: {smoothing_strength: '0.8'}"), "smoothing_strength"),
    ("a sparsity list with a word", _recipe("SparseGPTModifier: {sparsity: [0.5, x]}"), "sparsity is"),
    ("arguments that are a list", _recipe("QuantizationModifier: [1, 2]"), "arguments are a mapping"),
    ("a scheme mapping naming no scheme", _recipe("QuantizationModifier: {scheme: {NOPE: [Linear]}}"), "'NOPE'"),
    ("a choice it does not have", _recipe("AWQModifier: {duo_scaling: sometimes}"), "duo_scaling is 'both'"),
    ("65 patterns", _recipe(f"QuantizationModifier: {{ignore: {[f're:x{i}' for i in range(65)]}}}"), "at most 64"),
    ("a pattern of 8,000 instructions", _recipe("QuantizationModifier: {ignore: ['re:.{1000}x']}"), "RE2"),
    ("a backreference", _recipe("QuantizationModifier: {scheme: W8A16, ignore: ['re:(a)\\1']}"), "RE2"),
    ("a lookahead", _recipe("QuantizationModifier: {scheme: W8A16, targets: ['re:(?=x)Linear']}"), "RE2"),
    (
        "a lookbehind in a mapping",
        _recipe("SmoothQuantModifier: {mappings: [[['re:(?<=a)q_proj'], 're:.*input_layernorm']]}"),
        "RE2",
    ),
]


@pytest.mark.parametrize(("name", "recipe", "expected"), NEVER_RUN, ids=[case[0] for case in NEVER_RUN])
def test_a_recipe_that_could_never_run_is_a_400_naming_the_recipe(api, name, recipe, expected):
    response = api.post("/api/v1/jobs/", {"recipe_yaml": recipe}, format="json")

    assert response.status_code == 400, (name, response.content)
    assert expected in json.dumps(response.json()["recipe_yaml"]), response.json()
    assert not Job.objects.exists()


# Python's re backtracks on these for hours against a module name of 30 characters; RE2 answers at once.
CATASTROPHIC = ["re:(a+)+$", "re:(.*a){25}", r"re:([\w.]+)+!"]


def test_patterns_that_backtrack_for_hours_in_python_are_judged_at_once(api):
    recipe = _recipe(
        "QuantizationModifier: {scheme: FP8_DYNAMIC, targets: ['re:.*mlp\\.down_proj$'], ignore: "
        + json.dumps(["lm_head", *CATASTROPHIC])
        + "}"
    )
    started = time.process_time()

    response = api.post("/api/v1/jobs/", {"recipe_yaml": recipe, "calibration": {"kind": "none"}}, format="json")

    # The submission check matched every pattern against each of the built-in model's Linear layers
    assert response.status_code == 201, response.content
    assert time.process_time() - started < 1


def test_a_recipe_of_1200_groups_each_matched_against_every_layer_costs_the_web_process_under_a_second(api):
    # Given 64 KB of recipe: the most patterns allowed in the ignore list, and 1,200 config groups
    patterns = [f"re:.*mlp\\.(up|gate)_proj{i}" for i in range(61)] + CATASTROPHIC
    groups = ", ".join(f"g{i}: {{targets: [Linear], weights: {{num_bits: 8}}}}" for i in range(1200))
    recipe = _recipe(f"QuantizationModifier: {{ignore: {json.dumps(patterns)}, config_groups: {{{groups}}}}}")
    assert 60_000 < len(recipe) < 64 * 1024
    # (a web process that has served a submission: the built-in model's header is read once per process)
    body = {"preset": "fp8-dynamic", "calibration": {"kind": "none"}}
    assert api.post("/api/v1/jobs/", body, format="json").status_code == 201
    started = time.process_time()

    # When it is submitted for the built-in model (the group-size check matches each group against 211 layers)
    response = api.post("/api/v1/jobs/", {"recipe_yaml": recipe, "calibration": {"kind": "none"}}, format="json")

    # Then it is judged in well under a second of CPU (30 s when every group matched its lists layer by layer)
    assert response.status_code == 201, response.content
    assert time.process_time() - started < 1


def test_a_worker_given_patterns_that_backtrack_for_hours_compresses_in_seconds(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    from engine.runner import compress
    from engine.spec import CalibrationSpec, CompressionSpec

    # Given a data-free recipe for the tiny model whose ignore list holds patterns Python's re would match
    # against each module name for hours, and whose targets are a pattern too
    recipe = _recipe(
        "QuantizationModifier: {scheme: FP8_DYNAMIC, targets: ['re:.*mlp\\.down_proj$'], ignore: "
        + json.dumps(["lm_head", *CATASTROPHIC, "re:model\\.layers\\.1\\."])
        + "}"
    )
    spec = CompressionSpec(model=str(tiny_model_dir), recipe_yaml=recipe, calibration=CalibrationSpec(kind="none"))

    # When a worker runs it
    started = time.perf_counter()
    compress(spec, tmp_path / "ckpt")
    elapsed = time.perf_counter() - started

    # Then it ends in seconds, with exactly the layer the patterns leave quantized: layer 0's down_proj
    assert elapsed < 120, f"the run took {elapsed:.0f} s"
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as weights:
        scaled = {key.removesuffix(".weight_scale") for key in weights.keys() if key.endswith(".weight_scale")}
    assert scaled == {"model.layers.0.mlp.down_proj"}
    # And the checkpoint's config names layers, not the user's patterns (vLLM matches them with Python's re too)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    [group] = config["config_groups"].values()
    assert group["targets"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert "model.layers.1.mlp.down_proj" in config["ignore"] and "re:" not in json.dumps(config)
    # And the recorded recipe is the user's own
    assert (tmp_path / "ckpt" / "recipe.yaml").read_text() == recipe
