"""The floor search and the sweep (engine.search) on a tiny model: the real llm-compressor, the real held-out
scoring, the real checkpoint. The tiny model's embeddings are scaled up so that its next-token distribution is
sharp and fp8 costs it a little perplexity (99.9 % recovery), which a 100 % floor can only get back by keeping
layers in bf16: every move of the search is then exercised, in a few seconds a trial."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from engine.artifacts import verify_manifest
from engine.errors import EngineError
from engine.runner import compress
from engine.spec import CalibrationSpec, CompressionSpec, EvaluationSpec, QualityFloor, SearchBudget, SearchSpec
from engine.submission import check_search

FAST_EVALUATION = EvaluationSpec(limit=2)  # two held-out windows: the trials and the final evaluation


@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with embeddings (tied to the output head) 30 times larger: confident, so sensitive."""
    import torch
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("sharp-tiny")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30)
    model.save_pretrained(path)
    for tokenizer_file in tiny_model_dir.glob("*"):
        if tokenizer_file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(tokenizer_file, path)
    return path


@pytest.fixture(autouse=True)
def private_eval_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESSOR_EVAL_CACHE", str(tmp_path / "eval-cache"))


def _search(model, tmp_path, *, floor=None, budget=None, presets=(), preset="fp8-dynamic", calibration=None):
    events = []
    spec = CompressionSpec(
        model=str(model),
        preset=preset,
        calibration=calibration or CalibrationSpec(kind="none"),
        evaluation=FAST_EVALUATION,
        search=SearchSpec(
            floor=QualityFloor(at_least=floor) if floor else None, budget=budget or SearchBudget(), presets=presets
        ),
    )
    out = tmp_path / "ckpt"
    result = compress(spec, out, progress=events.append)
    return result, result.settings["search"], [e for e in events if e.log_line is None]


@pytest.fixture(scope="module")
def full_search(sharp_model, tmp_path_factory):
    """A 100 % floor with room for every move: fp8, then 1, 2, 4, 8, 14 layers kept."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPRESSOR_EVAL_CACHE", str(tmp_path_factory.mktemp("eval-cache")))
        return _search(sharp_model, tmp_path_factory.mktemp("search"), floor=1.0, budget=SearchBudget(max_trials=8))


def test_trials_keep_ever_more_of_the_most_sensitive_layers_and_stop_at_the_first_that_meets_the_floor(full_search):
    _result, search, events = full_search
    trials = search["trials"]
    # Trial 1 is the preset as it is, and it misses a 100 % floor
    assert trials[0]["change"] == "fp8-dynamic as it is" and trials[0]["kept_layers"] == []
    assert trials[0]["recovery"] < 100 and trials[0]["meets_floor"] is False
    # Trial 2 keeps fp8's weights and leaves the activations in bf16: the same size (the weights make it)
    assert trials[1]["change"] == "fp8-dynamic's weights, activations kept in bf16"
    assert trials[1]["bf16_activations"] is True and trials[1]["kept_layers"] == []
    assert abs(trials[1]["size_bytes"] - trials[0]["size_bytes"]) < 0.02 * trials[0]["size_bytes"]
    # Then the layers kept in bf16 double on top of the better of the two, always the top of the sensitivity ranking
    ranking = [entry["module"] for entry in search["sensitivity"]]
    assert len(ranking) == 14 and "model.layers.1.mlp.down_proj" in ranking
    base = max(trials[:2], key=lambda trial: trial["recovery"])
    counts = [len(trial["kept_layers"]) for trial in trials[2:]]
    assert counts == [1, 2, 4, 8, 14][: len(counts)]
    for trial in trials[2:]:
        assert set(trial["kept_layers"]) == set(ranking[: len(trial["kept_layers"])])
        assert trial["bf16_activations"] == base["bf16_activations"]
    # The search stops at the first trial that meets the floor (none after it), within the budget
    assert [t["meets_floor"] for t in trials] == [False] * (len(trials) - 1) + [True]
    assert search["stopped"] == "floor met" and search["met_floor"] is True and len(trials) <= 8
    # ...and the model was loaded once for every trial
    assert sum(1 for event in events if event.stage == "loading") == 1


def test_the_chosen_checkpoint_is_the_smallest_meeting_the_floor_with_its_kept_layers_in_the_recipe(full_search):
    result, search, _events = full_search
    meeting = [t for t in search["trials"] if t["meets_floor"]]
    chosen = next(t for t in search["trials"] if t["number"] == search["chosen"])
    assert chosen == min(meeting, key=lambda t: t["size_bytes"])
    # The checkpoint is that trial's: its size, a plain llm-compressor recipe with the kept layers in `ignore`
    folder = result.output_dir
    assert result.size_after_bytes == chosen["size_bytes"]
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    modifiers = recipe["compression_stage"]["compression_modifiers"]
    quantization = modifiers["QuantizationModifier"]
    if chosen["bf16_activations"]:  # fp8's weights as a config group of their own, no activations
        assert quantization["config_groups"]["group_0"]["weights"]["type"] == "float"
        assert "input_activations" not in quantization["config_groups"]["group_0"] and "scheme" not in quantization
    else:
        assert quantization["scheme"] == "FP8_DYNAMIC"
    assert quantization["ignore"] == ["lm_head", *sorted(chosen["kept_layers"])]
    # ...hashed without the other trials' folders, its results carrying every trial, its card saying why
    assert verify_manifest(folder) == [] and not (folder / ".trials").exists()
    saved = json.loads((folder / "results.json").read_text())
    assert [t["number"] for t in saved["settings"]["search"]["trials"]] == [t["number"] for t in search["trials"]]
    card = (folder / "README.md").read_text()
    assert "A floor search chose it" in card and "100.00 %" in card and f"| {chosen['number']} (chosen) |" in card
    # ...and its own evaluation, reloaded from the files, agrees with the trial's score
    perplexity = next(m for m in result.evaluation["metrics"] if m["name"] == "perplexity")
    assert perplexity["recovery"] == pytest.approx(chosen["recovery"], abs=0.05)


def test_the_activations_move_keeps_the_presets_weights_and_drops_its_activations():
    from engine.presets import get_preset
    from engine.search import kept_precision, weights_only

    fp8 = weights_only(get_preset("fp8-dynamic"))
    ((name, args),) = fp8.modifiers
    group = args["config_groups"]["group_0"]
    assert name == "QuantizationModifier" and "scheme" not in args and "input_activations" not in group
    assert group["weights"] == {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "strategy": "channel",
        "dynamic": False,
    }
    gptq = weights_only(get_preset("int8-w8a8-gptq"))
    assert gptq.modifiers[0][1]["config_groups"]["group_0"]["weights"]["type"] == "int"
    assert gptq.modifiers[0][1]["dampening_frac"] == 0.01
    # a weight-only preset has nothing to leave out
    assert weights_only(get_preset("w4a16-gptq")) is None
    # and only a 4-bit integer scheme keeps its sensitive layers at 8 bits; the others keep them in bf16
    assert kept_precision(get_preset("w4a16-gptq")) == "int8"
    assert [kept_precision(get_preset(name)) for name in ("fp8-dynamic", "int8-w8a8-gptq", "nvfp4")] == ["bf16"] * 3


@pytest.fixture(scope="module")
def short_builtin_model(builtin_model, tmp_path_factory):
    """The built-in model's first 4 decoder layers (of 30), its embeddings, norm and head: real trained weights,
    so int4 costs it quality, at a seventh of the compute."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("builtin-4-layers")
    model = AutoModelForCausalLM.from_pretrained(builtin_model, dtype=torch.bfloat16, num_hidden_layers=4)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(builtin_model).save_pretrained(path)
    return path


def test_inside_a_4_bit_scheme_the_most_sensitive_layers_are_kept_at_8_bits(short_builtin_model, tmp_path):
    # Given a 100 % floor for int4 GPTQ on 4 layers of the built-in model, with room for two trials (groups of
    # 128 divide only the down_proj layers' 1536 columns: the others stay in bf16, as the job asks)
    spec = CompressionSpec(
        model=str(short_builtin_model),
        preset="w4a16-gptq",
        # 1 024 calibration tokens: with 128 (4 x 32) GPTQ's Hessian of the 1 536-wide down_proj is so far from full
        # rank that which trial recovers more depends on the CPU's rounding (on one VM int4 alone beat the layer
        # kept at 8 bits, 91.1 % against 78.4 %); at 8 x 128 the 8-bit layer wins clearly (97.0 % against 92.9 %).
        calibration=CalibrationSpec(samples=8, max_seq_len=128),
        evaluation=FAST_EVALUATION,
        ignore_indivisible=True,
        search=SearchSpec(floor=QualityFloor(at_least=1.0), budget=SearchBudget(max_trials=2)),
    )
    result = compress(spec, tmp_path / "ckpt")
    search = result.settings["search"]

    # Then trial 2 keeps the most sensitive layer at 8 bits, not in bf16 (a 4-bit scheme has no activations move)
    first, second = search["trials"]
    assert first["change"] == "w4a16-gptq as it is" and first["recovery"] < 100
    assert second["change"] == "1 most sensitive layer kept at 8 bits" and second["kept_at"] == "int8"
    assert second["kept_layers"] == [search["sensitivity"][0]["module"]] and "down_proj" in second["kept_layers"][0]
    # ...it recovers more than int4 alone, and costs 4 more bits for each weight of that layer, not 12
    assert second["recovery"] > first["recovery"] and search["chosen"] == 2
    layer_weights = 576 * 1536
    grown = second["size_bytes"] - first["size_bytes"]
    assert 0.45 * layer_weights < grown < 0.6 * layer_weights, (grown, layer_weights)

    # ...and the checkpoint's recipe and config carry that layer in an 8-bit group of its own, in no ignore list
    folder = result.output_dir
    gptq = yaml.safe_load((folder / "recipe.yaml").read_text())["compression_stage"]["compression_modifiers"]
    groups = gptq["GPTQModifier"]["config_groups"]
    assert groups["kept_at_8_bits"]["targets"] == second["kept_layers"]
    assert groups["kept_at_8_bits"]["weights"]["num_bits"] == 8 and groups["group_0"]["weights"]["num_bits"] == 4
    assert second["kept_layers"][0] not in gptq["GPTQModifier"]["ignore"]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    bits = {group["weights"]["num_bits"]: group["targets"] for group in config["config_groups"].values()}
    assert bits[8] == second["kept_layers"] and bits[4] == ["Linear"]
    # ...which the final evaluation reloaded from the files, at trial 2's quality
    perplexity = next(m for m in result.evaluation["metrics"] if m["name"] == "perplexity")
    assert perplexity["recovery"] == pytest.approx(second["recovery"], abs=0.05)
    assert "at 8 bits" in (folder / "README.md").read_text()


def test_a_spent_budget_ends_the_search_with_the_best_trial_marked_as_missing_the_floor(sharp_model, tmp_path):
    # Given a 100 % floor and room for two trials
    result, search, _events = _search(sharp_model, tmp_path, floor=1.0, budget=SearchBudget(max_trials=2))

    # Then it stops after two, neither meets the floor, and the best of them is kept, marked as missing it
    assert len(search["trials"]) == 2 and search["stopped"] == "budget: 2 trials"
    best = max(search["trials"], key=lambda t: t["recovery"])
    assert search["chosen"] == best["number"] and search["met_floor"] is False
    assert "MISSES the floor" in (result.output_dir / "README.md").read_text()


def test_a_time_budget_allows_the_first_trial_and_no_more_once_spent(sharp_model, tmp_path):
    _result, search, _events = _search(sharp_model, tmp_path, floor=1.0, budget=SearchBudget(max_seconds=0.5))
    assert len(search["trials"]) == 1 and search["stopped"].startswith("budget: 0.5 s")


def test_a_sweep_measures_each_preset_on_one_load_and_keeps_the_best(sharp_model, tmp_path):
    # Given a sweep of fp8-dynamic and int8 GPTQ, without a floor
    calibration = CalibrationSpec(samples=4, max_seq_len=32)
    result, search, events = _search(
        sharp_model, tmp_path, presets=("int8-w8a8-gptq",), calibration=calibration, budget=SearchBudget(max_trials=4)
    )

    # Then each preset is one trial, the model was loaded once, and the checkpoint is the best recovery's
    assert [(t["preset"], t["change"]) for t in search["trials"]] == [
        ("fp8-dynamic", "fp8-dynamic as it is"),
        ("int8-w8a8-gptq", "int8-w8a8-gptq as it is"),
    ]
    assert search["kind"] == "sweep" and search["stopped"] == "every preset of the sweep measured"
    assert sum(1 for event in events if event.stage == "loading") == 1
    best = max(search["trials"], key=lambda t: t["recovery"])
    saved = json.loads((result.output_dir / "results.json").read_text())
    assert search["chosen"] == best["number"] and saved["preset"] == best["preset"]
    assert "A sweep of 2 trials" in (result.output_dir / "README.md").read_text()


def test_a_task_floor_judges_each_trial_on_the_tasks_scored_in_memory(sharp_model, tmp_path):
    # Given a floor of 100 % on an lm-eval task's recovery (20 items), with room for two trials
    evaluation = EvaluationSpec(tasks=("compressor_continuation",), limit=20)
    spec = CompressionSpec(
        model=str(sharp_model),
        preset="fp8-dynamic",
        calibration=CalibrationSpec(kind="none"),
        evaluation=evaluation,
        search=SearchSpec(floor=QualityFloor(metric="task_recovery", at_least=1.0), budget=SearchBudget(max_trials=2)),
    )
    result = compress(spec, tmp_path / "ckpt")
    search = result.settings["search"]

    # Then the baseline was scored once on the task, and each trial on the same items
    assert search["floor_metric"] == "task_recovery" and list(search["task_baseline"]) == ["compressor_continuation"]
    baseline = search["task_baseline"]["compressor_continuation"]
    assert 0 < baseline <= 100
    for trial in search["trials"]:
        score = trial["task_scores"]["compressor_continuation"]
        # ...its recovery is its score over the baseline's, and the floor is judged on it, not on perplexity
        assert trial["task_recovery"] == pytest.approx(100 * score / baseline)
        assert trial["meets_floor"] is (trial["task_recovery"] >= 100 - 1e-9)
    assert search["stopped"] in ("floor met", "budget: 2 trials")
    meeting = [t for t in search["trials"] if t["meets_floor"]]
    expected = (
        min(meeting, key=lambda t: (t["size_bytes"], -t["task_recovery"]))
        if meeting
        else max(search["trials"], key=lambda t: (t["task_recovery"], -t["size_bytes"]))
    )
    assert search["chosen"] == expected["number"]

    # ...and the card says what the floor was judged on, with each trial's task recovery
    card = (result.output_dir / "README.md").read_text()
    assert "average recovery of the evaluation's lm-eval tasks" in card and "| Task recovery |" in card
    chosen_task = next(m for m in result.evaluation["metrics"] if m["name"] == "compressor_continuation")
    assert chosen_task["baseline"] == pytest.approx(baseline)


def test_once_no_more_layers_fit_the_size_cap_the_calibration_moves_follow():
    from types import SimpleNamespace

    from engine.search import Trial, _Search

    # Given a SmoothQuant + int8 search whose size cap leaves no room to keep a layer in bf16
    budget = SearchBudget(max_trials=10, max_size_ratio=0.5)
    spec = CompressionSpec(
        preset="smoothquant-int8-w8a8",
        calibration=CalibrationSpec(samples=4, max_seq_len=32),
        search=SearchSpec(floor=QualityFloor(at_least=1.0), budget=budget),
    )
    state = _Search(spec, SimpleNamespace(calibration_records=[{"text": "x"}] * 16), size_before=1000)
    state.linear_params, state.ranking = (
        {"model.layers.0.mlp.down_proj": 100},
        [{"module": "model.layers.0.mlp.down_proj"}],
    )

    # When each move's trial misses the floor
    changes = []
    while (move := state.next_move()) is not None:
        changes.append(move)
        state.trials.append(
            Trial(
                len(changes),
                move,
                "",
                size_bytes=850,
                perplexity=1.0,
                recovery=99.0 + len(changes) / 10,
                kl=0.0,
                top1_agreement=0.0,
                seconds=0.0,
                meets_floor=False,
            )  # fmt: skip
        )

    # Then after the presets' own trials come twice the samples, then SmoothQuant's two other strengths, on the
    # best first-round trial (its activations in bf16), and then the search ends
    assert [m.change for m in changes] == [
        "smoothquant-int8-w8a8 as it is",
        "smoothquant-int8-w8a8's weights, activations kept in bf16",
        "8 calibration samples instead of 4",
        "SmoothQuant strength 0.5",
        "SmoothQuant strength 0.9",
    ]
    assert [(m.samples, m.smoothing) for m in changes[2:]] == [(8, None), (None, 0.5), (None, 0.9)]
    assert all(m.bf16_activations and m.kept == () for m in changes[2:]) and state.stopped == "no move left"


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (CompressionSpec(recipe_yaml="x: 1", search=SearchSpec(floor=QualityFloor())), "starts from a preset"),
        (CompressionSpec(preset="fp8-dynamic", search=SearchSpec(floor=QualityFloor(metric="mmlu"))), "Unknown floor"),
        (CompressionSpec(preset="fp8-dynamic", search=SearchSpec(floor=QualityFloor(at_least=99))), "at most 1"),
        (
            CompressionSpec(preset="fp8-dynamic", search=SearchSpec(floor=QualityFloor(metric="task_recovery"))),
            "needs the lm-eval tasks",
        ),
        (
            CompressionSpec(
                preset="fp8-dynamic",
                evaluation=EvaluationSpec(tasks=("compressor_arithmetic",), backend="vllm"),
                search=SearchSpec(floor=QualityFloor(metric="task_recovery")),
            ),
            "hf backend",
        ),
        (CompressionSpec(preset="fp8-dynamic", search=SearchSpec(budget=SearchBudget(max_trials=0))), "max_trials"),
        (CompressionSpec(preset="fp8-dynamic", search=SearchSpec(presets=("int9",))), "Unknown preset"),
        (
            CompressionSpec(
                preset="fp8-dynamic",
                calibration=CalibrationSpec(kind="none"),
                search=SearchSpec(presets=("fp8-static",)),
            ),
            "needs calibration",
        ),
    ],
)
def test_the_submission_check_refuses_a_search_that_cannot_run(spec, words):
    with pytest.raises(EngineError) as refused:
        check_search(spec)
    assert words in refused.value.message and refused.value.field in ("search", "preset", "calibration")
