"""Evaluation: baseline against compressed model, reported the way the seed model cards do.

Offline suite (needs no download): perplexity on held-out real text (CPython's pydoc_data.topics, never
used for calibration, or the user's own text), KL divergence of the compressed model's next-token
distribution from the baseline's, top-1 token agreement, and greedy generations side by side.
lm-eval tasks: any task lm-eval knows, plus the project's local tasks (engine.lm_tasks).

Recovery (compressed relative to baseline, 100 % = no loss):
- higher-is-better scores (accuracy): compressed / baseline;
- perplexity: baseline / compressed;
- KL divergence (0 for the baseline by definition): exp(-KL), 100 % for identical distributions;
- top-1 agreement (100 % for the baseline by definition): the agreement itself.

The baseline's side (its perplexity, top-k next-token distributions, generations and task scores) is
cached per (model, revision, settings), so many jobs on one model evaluate the baseline once. KL is
computed on the baseline's top-64 tokens plus one bucket for the rest of the mass: a coarse-grained KL,
never larger than the exact one, and close to it because the tail carries little mass.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.lm_tasks import LOCAL_TASKS, write_local_tasks
from engine.spec import EvaluationSpec, ProgressEvent

ProgressCallback = Callable[[ProgressEvent], None]

WINDOWS = 16
WINDOW_TOKENS = 256
TOP_K = 64
GENERATION_TOKENS = 32
CACHE_VERSION = 2  # bump when the baseline's measurements change, so that stale cache entries are not used
PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the ocean.",
    "List three primary colors.",
)
# The OpenLLM v1 set of the seed cards: few-shot count and the metric the cards report.
OPENLLM_TASKS: dict[str, tuple[int, str, str]] = {
    "mmlu": (5, "acc,none", "MMLU"),
    "arc_challenge": (25, "acc_norm,none", "ARC Challenge"),
    "gsm8k": (5, "exact_match,strict-match", "GSM-8K (strict-match)"),
    "hellaswag": (10, "acc_norm,none", "Hellaswag"),
    "winogrande": (5, "acc,none", "Winogrande"),
    "truthfulqa_mc2": (0, "acc,none", "TruthfulQA"),
}


def evaluate(
    spec: EvaluationSpec,
    *,
    baseline_dir: Path,
    compressed_dir: Path,
    baseline_key: str,
    cache_dir: Path,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Evaluate both models; return metrics with recovery, generations and failed tasks (JSON-ready)."""
    emit = _emitter(progress, total=2 + len(spec.tasks))
    settings = _settings(spec)
    cache_file = Path(cache_dir) / f"baseline-{_digest([baseline_key, settings])}.pt"
    baseline, cache_hit = _cached_baseline(cache_file)
    if baseline is None:
        emit(1, "baseline model")
        baseline = _measure(Path(baseline_dir), spec, settings, device, reference=None)
        _store_baseline(cache_file, baseline)
    else:
        emit(1, "baseline model (cached)")
    emit(2, "compressed model")
    compressed = _measure(Path(compressed_dir), spec, settings, device, reference=baseline, emit=emit)
    metrics = _offline_metrics(baseline, compressed) if spec.offline else []
    metrics += _task_metrics(spec, baseline["tasks"], compressed["tasks"])
    return {
        "metrics": metrics,
        "average": _average(metrics),
        "generations": [
            {"prompt": p, "baseline": b, "compressed": c}
            for p, b, c in zip(PROMPTS, baseline["generations"], compressed["generations"], strict=False)
        ],
        "tasks_failed": compressed["tasks_failed"],
        "settings": settings,
        "baseline_cache_hit": cache_hit,
    }


def recovery(baseline: float | None, compressed: float | None, *, higher_is_better: bool) -> float | None:
    """Compressed relative to baseline in percent (100 = no loss), for either direction of metric."""
    if baseline is None or compressed is None:
        return None
    if higher_is_better:
        return 100.0 * compressed / baseline if baseline else None
    return 100.0 * baseline / compressed if compressed else None


# --- measuring one model -----------------------------------------------------------------------


def _measure(path: Path, spec: EvaluationSpec, settings: dict, device: str, *, reference, emit=None) -> dict:
    model, tokenizer = _load(path, device)
    result: dict[str, Any] = {"generations": [], "tasks": {}, "tasks_failed": []}
    if spec.offline:
        windows = _heldout_windows(tokenizer, spec)
        result.update(_score_windows(model, windows, reference))
        result["generations"] = [_generate(model, tokenizer, prompt) for prompt in PROMPTS]
    if spec.tasks:
        scores, failed = _run_tasks(path, model, tokenizer, spec, device, emit)
        result["tasks"], result["tasks_failed"] = scores, failed
    del model
    return result


def _load(path: Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16}
    config = json.loads((path / "config.json").read_text())
    if config.get("quantization_config", {}).get("quant_method") == "compressed-tensors":
        from transformers.utils.quantization_config import CompressedTensorsConfig

        # Dequantize on load: runs anywhere (CPU included) with the compressed weights' exact values.
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def heldout_text(path: str | None = None) -> str:
    """Held-out prose: the user's file, or the documentation topics that ship with CPython."""
    if path:
        text = Path(path).read_text(encoding="utf-8")
        if len(text) < 1000:
            raise EngineError("The held-out text is too short (at least 1000 characters).", field="evaluation")
        return text
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _heldout_windows(tokenizer, spec: EvaluationSpec):
    import torch

    ids = tokenizer(heldout_text(spec.heldout_path), add_special_tokens=False)["input_ids"]
    count = min(spec.limit or WINDOWS, WINDOWS, max(1, len(ids) // WINDOW_TOKENS))
    stride = max(WINDOW_TOKENS, (len(ids) - WINDOW_TOKENS) // max(1, count))  # spread over the whole text
    return torch.tensor([ids[i * stride : i * stride + WINDOW_TOKENS] for i in range(count)])


def _score_windows(model, windows, reference: dict | None) -> dict:
    """Perplexity, and (against a baseline reference) KL divergence and top-1 agreement."""
    import torch

    nll_sum, tokens, kl_sum, agree = 0.0, 0, 0.0, 0
    top_values, top_indices, top1 = [], [], []
    with torch.no_grad():
        for index, window in enumerate(windows):
            logprobs = torch.log_softmax(model(window[None]).logits[0, :-1].float(), dim=-1)
            targets = window[1:]
            nll_sum += -logprobs.gather(1, targets[:, None]).sum().item()
            tokens += targets.numel()
            if reference is None:
                values, indices = logprobs.topk(TOP_K, dim=-1)
                top_values.append(values.half())
                top_indices.append(indices.int())
                top1.append(logprobs.argmax(-1).int())  # the same op as below: ties break alike
            else:
                kl_sum += _coarse_kl(reference["top_values"][index].float(), reference["top_indices"][index], logprobs)
                agree += (logprobs.argmax(-1).int() == reference["top1"][index]).sum().item()
    result = {"perplexity": math.exp(nll_sum / tokens), "tokens": tokens}
    if reference is None:
        result.update(top_values=top_values, top_indices=top_indices, top1=top1)
    else:
        result.update(kl=kl_sum / tokens, top1_agreement=100.0 * agree / tokens)
    return result


def _coarse_kl(base_top, base_idx, logprobs) -> float:
    """KL(baseline || compressed) over the baseline's top-k tokens plus one bucket for the rest."""
    import torch

    p, q = base_top.exp(), logprobs.gather(1, base_idx.long()).exp()
    p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - q.sum(-1)).clamp_min(1e-12)
    kl = (p * (base_top - q.clamp_min(1e-30).log())).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return torch.clamp(kl, min=0).sum().item()


def _generate(model, tokenizer, prompt: str) -> str:
    import torch

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = inputs.to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=GENERATION_TOKENS, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


# --- lm-eval -----------------------------------------------------------------------------------


def _run_tasks(path: Path, model, tokenizer, spec: EvaluationSpec, device: str, emit) -> tuple[dict, list]:
    """Run each task on its own, so that one unreachable data set fails that task only."""
    scores, failed = {}, []
    if spec.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        reason = "vLLM is not installed on this worker (it is the GPU workers' extra); use the hf backend."
        return {}, [{"task": task, "reason": reason} for task in spec.tasks]
    for number, task in enumerate(spec.tasks, start=1):
        if emit:
            emit(2 + number, f"lm-eval {task}")
        try:
            scores[task] = _run_task(path, model, tokenizer, task, spec, device)
        except Exception as exc:  # lm-eval and datasets raise many kinds; the reason goes in the report
            failed.append({"task": task, "reason": _task_failure_reason(task, exc)})
    return scores, failed


def _run_task(path: Path, model, tokenizer, task: str, spec: EvaluationSpec, device: str) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from engine.models import hub_reachable

    include = write_local_tasks(Path(os.environ.get("COMPRESSOR_TASKS_DIR", _default_tasks_dir())))
    task_manager = TaskManager(include_path=str(include))
    if task not in task_manager.all_tasks:
        raise EngineError(f"lm-eval does not know a task named '{task}'.")
    if task not in LOCAL_TASKS and not hub_reachable():
        raise EngineError("its data set lives on the Hugging Face hub, which this machine cannot reach.")
    shots = OPENLLM_TASKS.get(task, (0, "", ""))[0]
    if spec.backend == "vllm":
        # vLLM loads the checkpoint itself (compressed-tensors kernels on the GPU), as the seed cards did.
        lm = "vllm"
        model_args = f"pretrained={path},dtype=auto,gpu_memory_utilization=0.4,max_model_len=4096,add_bos_token=True"
    else:
        lm, model_args = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=8), None
    output = lm_eval.simple_evaluate(
        model=lm,
        model_args=model_args,
        tasks=[task],
        num_fewshot=shots or None,
        limit=spec.limit,
        task_manager=task_manager,
        log_samples=False,
        bootstrap_iters=1000,
    )
    values = output["results"][task]
    metric = OPENLLM_TASKS.get(task, (0, "acc,none", ""))[1]
    if metric not in values:
        metric = next(k for k in values if "," in k and "stderr" not in k)
    stderr = values.get(metric.replace(",", "_stderr,", 1))
    return {
        "metric": metric,
        "value": 100.0 * values[metric],
        "stderr": 100.0 * stderr if isinstance(stderr, int | float) else None,
        "n_shot": shots,
    }


def _task_failure_reason(task: str, exc: Exception) -> str:
    if isinstance(exc, EngineError):
        return exc.message
    return f"The task could not run: {(str(exc) or type(exc).__name__)[:300]}"


def _default_tasks_dir() -> Path:
    from engine.models import default_store

    return default_store().parent / "lm_tasks"


def default_cache_dir() -> Path:
    """Where baseline results are cached (COMPRESSOR_EVAL_CACHE, else beside the model store)."""
    from engine.models import default_store

    return Path(os.environ.get("COMPRESSOR_EVAL_CACHE") or default_store().parent / "eval-cache")


# --- results -----------------------------------------------------------------------------------


def _offline_metrics(baseline: dict, compressed: dict) -> list[dict]:
    return [
        _metric("perplexity", "Perplexity (held-out text)", baseline["perplexity"], compressed["perplexity"], False),
        {
            **_metric("kl_divergence", "KL divergence from baseline", 0.0, compressed["kl"], False),
            "recovery": 100.0 * math.exp(-compressed["kl"]),
        },
        {
            **_metric("top1_agreement", "Top-1 token agreement (%)", 100.0, compressed["top1_agreement"], True),
        },
    ]


def _task_metrics(spec: EvaluationSpec, baseline: dict, compressed: dict) -> list[dict]:
    metrics = []
    for task in spec.tasks:
        if task in baseline and task in compressed:
            shots = compressed[task]["n_shot"]
            label = f"{OPENLLM_TASKS.get(task, (0, '', task))[2] or task} ({shots}-shot)"
            metric = _metric(task, label, baseline[task]["value"], compressed[task]["value"], True)
            metric.update(
                baseline_stderr=baseline[task]["stderr"],
                compressed_stderr=compressed[task]["stderr"],
                n_shot=shots,
                task=True,
            )
            metrics.append(metric)
    return metrics


def _metric(name: str, label: str, base: float, comp: float, higher_is_better: bool) -> dict:
    return {
        "name": name,
        "label": label,
        "baseline": base,
        "compressed": comp,
        "recovery": recovery(base, comp, higher_is_better=higher_is_better),
        "higher_is_better": higher_is_better,
    }


def _average(metrics: list[dict]) -> dict | None:
    """The seed cards' "Average" row: the mean lm-eval score, when there are at least two tasks."""
    tasks = [m for m in metrics if m.get("task")]
    if len(tasks) < 2:
        return None
    base = sum(m["baseline"] for m in tasks) / len(tasks)
    comp = sum(m["compressed"] for m in tasks) / len(tasks)
    return {"baseline": base, "compressed": comp, "recovery": recovery(base, comp, higher_is_better=True)}


# --- baseline cache ----------------------------------------------------------------------------


def _settings(spec: EvaluationSpec) -> dict:
    heldout = "pydoc_data.topics" if not spec.heldout_path else _file_digest(Path(spec.heldout_path))
    return {
        "version": CACHE_VERSION,
        "offline": spec.offline,
        "heldout": heldout,
        "windows": min(spec.limit or WINDOWS, WINDOWS),
        "window_tokens": WINDOW_TOKENS,
        "generation_tokens": GENERATION_TOKENS,
        "tasks": list(spec.tasks),
        "limit": spec.limit,
        "backend": spec.backend,
    }


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:24]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:24]


def _cached_baseline(path: Path) -> tuple[dict | None, bool]:
    import torch

    if not path.is_file():
        return None, False
    try:
        return torch.load(path, weights_only=True), True
    except Exception:  # a damaged cache entry is recomputed, never trusted
        return None, False


def _store_baseline(path: Path, baseline: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(baseline, tmp)
    os.replace(tmp, path)  # concurrent workers never read half a file


def _emitter(progress: ProgressCallback | None, total: int):
    def emit(step: int, message: str) -> None:
        if progress:
            progress(ProgressEvent(stage="evaluating", step=step, total=total, message=f"Evaluating: {message}"))

    return emit
