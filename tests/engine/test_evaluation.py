"""Evaluation on a tiny random-weight model against its own FP8 copy (fast on a CPU, nothing downloaded)."""

import json

import pytest

import engine.evaluation as evaluation
from engine.card import write_model_card
from engine.evaluation import evaluate
from engine.presets import PRESETS
from engine.runner import compress
from engine.spec import CalibrationSpec, CompressionSpec, EvaluationSpec
from engine.units import recovery_percent

METRIC_KEYS = {
    "name", "label", "baseline", "compressed", "recovery", "higher_is_better",
    "baseline_stderr", "compressed_stderr", "n_shot", "task",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_fp8(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-fp8") / "ckpt"
    compress(CompressionSpec(model=str(tiny_model_dir), preset="fp8-dynamic"), out)
    return out


@pytest.fixture(autouse=True)
def local_tasks_dir(tmp_path_factory, monkeypatch):
    """The local lm-eval tasks are written here rather than beside the model store."""
    monkeypatch.setenv("COMPRESSOR_TASKS_DIR", str(tmp_path_factory.getbasetemp() / "lm_tasks"))


@pytest.fixture
def loads(monkeypatch):
    """The folders whose model the evaluation loaded, in order (a spy: the loading itself is real)."""
    seen = []
    real_load = evaluation._load

    def load(path, *args):
        seen.append(path)
        return real_load(path, *args)

    monkeypatch.setattr(evaluation, "_load", load)
    return seen


def run(spec, tiny_model_dir, tiny_fp8, cache_dir, events=None):
    return evaluate(
        spec,
        baseline_dir=tiny_model_dir,
        compressed_dir=tiny_fp8,
        baseline_key="tiny",
        cache_dir=cache_dir,
        progress=events.append if events is not None else None,
    )


def test_recovery_is_defined_for_both_directions():
    assert recovery_percent(80.0, 76.0, higher_is_better=True) == pytest.approx(95.0)
    assert recovery_percent(10.0, 12.5, higher_is_better=False) == pytest.approx(80.0)
    assert recovery_percent(None, 1.0, higher_is_better=True) is None


def test_offline_suite_reports_each_metric_with_consistent_recovery(tiny_model_dir, tiny_fp8, tmp_path):
    events = []
    result = run(EvaluationSpec(limit=4), tiny_model_dir, tiny_fp8, tmp_path, events)
    json.dumps(result)  # goes into Job.results as is
    metrics = {m["name"]: m for m in result["metrics"]}
    assert set(metrics) == {"perplexity", "kl_divergence", "top1_agreement"}
    assert all(set(m) == METRIC_KEYS for m in metrics.values())
    ppl = metrics["perplexity"]
    assert ppl["baseline"] > 1 and ppl["compressed"] > 1 and ppl["higher_is_better"] is False
    assert ppl["recovery"] == pytest.approx(100 * ppl["baseline"] / ppl["compressed"])
    # KL and top-1 agreement already compare the two models: no recovery (it would be a made-up number)
    kl = metrics["kl_divergence"]
    assert kl["baseline"] == 0 and kl["compressed"] > 0 and kl["recovery"] is None
    top1 = metrics["top1_agreement"]
    assert 0 <= top1["compressed"] <= 100 and top1["recovery"] is None
    assert result["settings"]["windows"] == 4 and result["settings"]["scored_tokens"] == 4 * 255
    assert [g["prompt"] for g in result["generations"]] == list(evaluation.PROMPTS)
    # Progress in thousandths, moving window by window and generation by generation on each model
    steps = [e.step for e in events]
    assert {(e.stage, e.total) for e in events} == {("evaluating", 1000)} and steps == sorted(steps)
    assert steps[0] == 0 and steps[-1] == 1000 and len(set(steps)) == 2 * (4 + 3) + 1
    assert "baseline, perplexity" in events[0].message and "compressed, perplexity" in events[-1].message


def test_baseline_is_evaluated_once_per_model_and_settings(tiny_model_dir, tiny_fp8, tmp_path, loads):
    first = run(EvaluationSpec(limit=2), tiny_model_dir, tiny_fp8, tmp_path)
    second = run(EvaluationSpec(limit=2), tiny_model_dir, tiny_fp8, tmp_path)
    other_settings = run(EvaluationSpec(limit=3), tiny_model_dir, tiny_fp8, tmp_path)
    assert [first["baseline_cache_hit"], second["baseline_cache_hit"], other_settings["baseline_cache_hit"]] == [
        False,
        True,
        False,
    ]
    # The second job loaded only the compressed model, and measured the same baseline.
    assert loads == [tiny_model_dir, tiny_fp8, tiny_fp8, tiny_model_dir, tiny_fp8]
    assert second["metrics"] == first["metrics"] and second["generations"] == first["generations"]
    assert len(list(tmp_path.glob("baseline-offline-*.pt"))) == 2


def test_local_lm_eval_task_runs_offline_and_unrunnable_tasks_fail_alone(
    tiny_model_dir, tiny_fp8, tmp_path, monkeypatch, loads
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine that cannot reach the hub
    spec = EvaluationSpec(offline=False, tasks=("compressor_arithmetic", "arc_challenge", "no_such_task"), limit=8)
    events = []
    result = run(spec, tiny_model_dir, tiny_fp8, tmp_path, events)
    (metric,) = result["metrics"]
    assert metric["name"] == "compressor_arithmetic" and metric["label"] == "compressor_arithmetic (3-shot)"
    assert metric["n_shot"] == 3 and metric["baseline_stderr"] is not None and metric["compressed_stderr"] is not None
    assert 0 <= metric["baseline"] <= 100 and 0 <= metric["compressed"] <= 100
    if metric["baseline"]:
        assert metric["recovery"] == pytest.approx(100 * metric["compressed"] / metric["baseline"])
    failed = {f["task"]: f["reason"] for f in result["tasks_failed"]}
    assert failed["no_such_task"] == "lm-eval does not know a task named 'no_such_task'."
    assert "Hugging Face hub, which this machine cannot reach" in failed["arc_challenge"]
    assert set(failed) == {"no_such_task", "arc_challenge"} and result["baseline_cache_hit"] is False
    # Progress moves batch by batch of lm-eval requests within each model's run of the task
    steps = [e.step for e in events]
    assert steps == sorted(steps) and len([step for step in steps if 0 < step < 500]) >= 2

    again = run(spec, tiny_model_dir, tiny_fp8, tmp_path)
    assert again["baseline_cache_hit"] is True and again["metrics"][0]["baseline"] == metric["baseline"]
    assert loads == [tiny_model_dir, tiny_fp8, tiny_fp8]


def test_vllm_backend_without_vllm_fails_the_tasks_with_a_reason(tiny_model_dir, tiny_fp8, tmp_path):
    spec = EvaluationSpec(offline=False, tasks=("compressor_arithmetic",), backend="vllm")
    result = run(spec, tiny_model_dir, tiny_fp8, tmp_path)
    assert result["metrics"] == []
    assert "vLLM is not installed" in result["tasks_failed"][0]["reason"]


def test_a_model_compared_with_itself_recovers_everything(tiny_model_dir, tmp_path):
    result = evaluate(
        EvaluationSpec(limit=2),
        baseline_dir=tiny_model_dir,
        compressed_dir=tiny_model_dir,
        baseline_key="self",
        cache_dir=tmp_path,
    )
    for metric in result["metrics"]:
        assert metric["recovery"] is None or metric["recovery"] == pytest.approx(100.0, abs=1e-3), metric


def test_card_shows_the_measured_numbers(tiny_model_dir, tiny_fp8, tmp_path):
    result = run(EvaluationSpec(limit=2), tiny_model_dir, tiny_fp8, tmp_path)
    card = write_model_card(
        tmp_path,
        model_name="tiny-fp8-dynamic",
        base_model="tiny",
        architecture="LlamaForCausalLM",
        preset=PRESETS["fp8-dynamic"],
        recipe_yaml=PRESETS["fp8-dynamic"].recipe_yaml(),
        calibration=CalibrationSpec(kind="none"),
        evaluation=result,
        size_before_bytes=2_000_000,
        size_after_bytes=1_200_000,
    ).read_text()
    for metric in result["metrics"]:
        assert f"| {metric['label']} |" in card
    ppl = result["metrics"][0]
    assert f"| {ppl['baseline']:.2f} | {ppl['compressed']:.2f} | {ppl['recovery']:.2f} % |" in card
    assert "2 windows of up to 256 tokens (510 tokens scored)" in card and "pydoc_data.topics" in card
    assert "data-free" in card and "This model:\n\n> " in card
