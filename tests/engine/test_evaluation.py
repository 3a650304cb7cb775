"""Evaluation on a tiny model (fast) against its own FP8 copy."""

import math

import pytest

from engine.evaluation import evaluate, recovery
from engine.runner import compress
from engine.spec import CompressionSpec, EvaluationSpec


@pytest.fixture(scope="module")
def tiny_fp8(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-fp8") / "ckpt"
    compress(CompressionSpec(model=str(tiny_model_dir), preset="fp8-dynamic"), out)
    return out


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
    assert recovery(80.0, 76.0, higher_is_better=True) == pytest.approx(95.0)
    assert recovery(10.0, 12.5, higher_is_better=False) == pytest.approx(80.0)
    assert recovery(None, 1.0, higher_is_better=True) is None


def test_offline_suite_reports_each_metric_with_consistent_recovery(tiny_model_dir, tiny_fp8, tmp_path):
    events = []
    result = run(EvaluationSpec(limit=4), tiny_model_dir, tiny_fp8, tmp_path, events)
    metrics = {m["name"]: m for m in result["metrics"]}
    assert set(metrics) == {"perplexity", "kl_divergence", "top1_agreement"}
    ppl = metrics["perplexity"]
    assert ppl["baseline"] > 1 and ppl["compressed"] > 1
    assert ppl["recovery"] == pytest.approx(100 * ppl["baseline"] / ppl["compressed"])
    kl = metrics["kl_divergence"]
    assert kl["compressed"] >= 0 and kl["recovery"] == pytest.approx(100 * math.exp(-kl["compressed"]))
    assert 0 <= metrics["top1_agreement"]["compressed"] <= 100
    assert len(result["generations"]) == 3 and all("baseline" in g for g in result["generations"])
    assert {e.stage for e in events} == {"evaluating"}


def test_baseline_is_evaluated_once_per_model_and_settings(tiny_model_dir, tiny_fp8, tmp_path):
    first = run(EvaluationSpec(limit=2), tiny_model_dir, tiny_fp8, tmp_path)
    second = run(EvaluationSpec(limit=2), tiny_model_dir, tiny_fp8, tmp_path)
    other_settings = run(EvaluationSpec(limit=3), tiny_model_dir, tiny_fp8, tmp_path)
    assert (first["baseline_cache_hit"], second["baseline_cache_hit"]) == (False, True)
    assert other_settings["baseline_cache_hit"] is False
    assert second["metrics"][0]["baseline"] == first["metrics"][0]["baseline"]
    assert len(list(tmp_path.glob("baseline-*.pt"))) == 2


def test_local_lm_eval_task_runs_offline_and_unknown_tasks_fail_alone(tiny_model_dir, tiny_fp8, tmp_path):
    spec = EvaluationSpec(offline=False, tasks=("compressor_arithmetic", "no_such_task"), limit=8)
    result = run(spec, tiny_model_dir, tiny_fp8, tmp_path)
    (metric,) = result["metrics"]
    assert metric["name"] == "compressor_arithmetic" and metric["label"].endswith("(0-shot)")
    assert 0 <= metric["baseline"] <= 100 and metric["baseline_stderr"] is not None
    if metric["baseline"]:
        assert metric["recovery"] == pytest.approx(100 * metric["compressed"] / metric["baseline"])
    assert result["tasks_failed"] == [
        {"task": "no_such_task", "reason": "lm-eval does not know a task named 'no_such_task'."}
    ]


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
        assert metric["recovery"] == pytest.approx(100.0, abs=1e-3), metric
