"""Floor search and sweep: find the smallest checkpoint that keeps a stated quality, in one load of the model.

A job with a SearchSpec runs engine.runner's pipeline with the trials as the step that produces its checkpoint
(search_checkpoint), so preflight, the memory plan, resume, data-parallel calibration, the vLLM check, the
evaluation, the card and the hashes are the plain run's. The model is loaded once and
the baseline scored once on the offline suite's held-out windows; each trial compresses a fresh copy of the
original weights (copied in memory, never reloaded from disk), scores it on the same windows, and saves it,
keeping only the folder of the checkpoint chosen so far. The trials, in order:

1. each preset as it is (one preset for a floor search, several for a sweep);
2. while the floor is not met: the most sensitive Linear layers kept at higher precision, 1, 2, 4, 8, ... of
   them: in bf16 (added to the recipe's `ignore`), or, inside a 4-bit integer scheme, at 8 bits (a config
   group of their own, the 4-bit group's strategy with 8 bits: half the cost of bf16 per kept weight),
   ranked by a probe on the first trial's compressed model: each Linear's output error (compressed weights
   and activations against the original weights, on the same input), measured on a few calibration
   samples, never on the held-out text the floor is judged on;
3. then, for calibrated presets, twice the calibration samples, and SmoothQuant's strength where the preset
   smooths, on the largest kept set the size cap allows.

The search stops when a trial meets the floor, when the budget (trials, seconds) is spent or when no move
is left. The chosen checkpoint is the smallest that meets the floor; when none does, the one with the best
recovery, marked as missing it. Its recipe.yaml is a plain llm-compressor recipe with the kept layers in
`ignore`, evaluated, carded and hashed like any other checkpoint; results.json carries every trial.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import calibration as calib
from engine.artifacts import weights_bytes
from engine.errors import EngineError
from engine.evaluation import heldout_scores, runnable_tasks, task_score_in_memory
from engine.plan import placed_model
from engine.preflight import PreflightReport
from engine.presets import PRESETS, Preset, get_preset
from engine.run import Run
from engine.spec import CalibrationSpec, CompressionSpec, EvaluationSpec, SearchSpec, Stage
from engine.stages import (
    Checkpoint,
    Reporter,
    layer_error_hooks,
    run_oneshot,
)
from engine.submission import (
    FLOOR_METRICS,
    PERPLEXITY_FLOOR,
    TASK_FLOOR,
    check_calibration,
    fit_preset,
    header_layers,
    sweep_presets,
)
from engine.units import recovery_percent, size_text

TRIAL_LINE = "Trial "  # how each trial's log line begins (the engine's CLI prints them as they come)
_PROBE_SAMPLES, _PROBE_TOKENS = 2, 256
_TRIAL_SCORE_S = 5.0  # scoring one trial on the held-out windows, as engine.stages weighs its stages
# SmoothQuant strengths tried after the preset's own (0.8): weaker and stronger migration of outliers.
_SMOOTHING_STRENGTHS = (0.5, 0.9)


@dataclass(frozen=True)
class Move:
    """What one trial changes, against the preset as it is."""

    preset: str
    kept: tuple[str, ...] = ()
    samples: int | None = None
    smoothing: float | None = None
    bf16_activations: bool = False  # the preset's weights, its activation quantization left out
    kept_at: str = "bf16"  # the precision of the kept layers: "bf16", or "int8" inside a 4-bit integer scheme
    change: str = ""


@dataclass
class Trial:
    number: int
    move: Move
    recipe_yaml: str
    size_bytes: int
    perplexity: float
    recovery: float  # percent of the baseline's perplexity (engine.units)
    kl: float
    top1_agreement: float
    seconds: float
    meets_floor: bool | None
    layer_errors: list[dict[str, Any]] = field(default_factory=list)
    folder: Path | None = None
    task_recovery: float | None = None  # percent: the tasks' average recovery, for a task floor
    task_scores: dict[str, float] = field(default_factory=dict)  # each task's score, percent

    @property
    def quality(self) -> float:
        """What the floor is judged on: the tasks' average recovery for a task floor, else perplexity's."""
        return self.recovery if self.task_recovery is None else self.task_recovery

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "preset": self.move.preset,
            "change": self.move.change,
            "kept_layers": list(self.move.kept),
            "kept_at": self.move.kept_at if self.move.kept else None,
            "calibration_samples": self.move.samples,
            "smoothing_strength": self.move.smoothing,
            "bf16_activations": self.move.bf16_activations,
            "size_bytes": self.size_bytes,
            "perplexity": self.perplexity,
            "recovery": self.recovery,
            "kl_divergence": self.kl,
            "top1_agreement": self.top1_agreement,
            "task_recovery": self.task_recovery,
            "task_scores": self.task_scores,
            "seconds": round(self.seconds, 2),
            "meets_floor": self.meets_floor,
        }


class _Search:
    """The state of one search: the trials so far, the layer ranking, and what to try next."""

    def __init__(self, spec: CompressionSpec, report: PreflightReport, size_before: int) -> None:
        self.spec, self.report, self.size_before = spec, report, size_before
        self.search = spec.search or SearchSpec()
        self.trials: list[Trial] = []
        self.ranking: list[dict[str, Any]] = []
        self.linear_params: dict[str, int] = {}
        self.linear_widths: dict[str, int] = {}
        self.started = time.perf_counter()
        self.stopped = ""
        self.task_baseline: dict[str, float] = {}  # a task floor: the baseline's score on each task, percent
        self.device = "cpu"  # where the model runs (the plan's placement), for the task floor's lm-eval runs

    @property
    def floor_metric(self) -> str:
        return self.search.floor.metric if self.search.floor else PERPLEXITY_FLOOR

    @property
    def floor_percent(self) -> float | None:
        return 100.0 * self.search.floor.at_least if self.search.floor else None

    def meets(self, recovery: float) -> bool | None:
        return None if self.floor_percent is None else recovery >= self.floor_percent - 1e-9

    def within_cap(self, size: float) -> bool:
        cap = self.search.budget.max_size_ratio
        return cap is None or size <= cap * self.size_before

    def chosen(self) -> Trial | None:
        """The smallest trial meeting the floor (within the size cap); else the best recovery."""
        meeting = [t for t in self.trials if t.meets_floor and self.within_cap(t.size_bytes)]
        if meeting:
            return min(meeting, key=lambda t: (t.size_bytes, -t.quality))
        return max(self.trials, key=lambda t: (t.quality, -t.size_bytes), default=None)

    def next_move(self) -> Move | None:
        """The next trial, or None with self.stopped saying why the search ends."""
        budget = self.search.budget
        if len(self.trials) >= budget.max_trials:
            self.stopped = f"budget: {budget.max_trials} trials"
            return None
        elapsed = time.perf_counter() - self.started
        last = self.trials[-1].seconds if self.trials else 0.0
        if self.trials and budget.max_seconds is not None and elapsed + last > budget.max_seconds:
            self.stopped = f"budget: {budget.max_seconds:g} s (another trial would pass it)"
            return None
        tried = {t.move.preset for t in self.trials}
        for preset in sweep_presets(self.spec):
            if preset not in tried:
                return Move(preset=preset, change=f"{preset} as it is")
        if self.floor_percent is None:
            self.stopped = "every preset of the sweep measured"
            return None
        if any(t.meets_floor and self.within_cap(t.size_bytes) for t in self.trials):
            self.stopped = "floor met"
            return None
        move = self._activations_move() or self._keep_more_layers() or self._calibration_move()
        if move is None:
            self.stopped = "no move left"
        return move

    def base(self) -> Trial:
        """The first-round trial that escalation starts from: the best recovery of the presets as they are and
        with their activations in bf16."""
        first = [t for t in self.trials if not t.move.kept and t.move.samples is None and t.move.smoothing is None]
        return max(first, key=lambda t: t.quality)

    def estimated_size(self, kept: tuple[str, ...], kept_at: str = "bf16") -> float:
        """A trial's size with `kept` layers in bf16 (or 8 bits inside 4), from the base trial's bytes per
        quantized weight."""
        base = self.base()
        quantized = sum(self.linear_params.values()) or 1
        per_param = (base.size_bytes - (self.size_before - 2 * quantized)) / quantized
        extra = 0.5 if kept_at == "int8" else 2 - per_param  # 4 more bits a weight (same scales), or all 16
        return base.size_bytes + sum(self.linear_params.get(name, 0) for name in kept) * extra

    def _activations_move(self) -> Move | None:
        """Each preset of the search once with its weights as it quantizes them and its activations left in bf16
        (as large as the preset, since the weights make the size; vLLM then runs weight-only kernels)."""
        done = {t.move.preset for t in self.trials if t.move.bf16_activations}
        for preset in sweep_presets(self.spec):
            if preset not in done and weights_only(get_preset(preset)) is not None:
                change = f"{preset}'s weights, activations kept in bf16"
                return Move(preset=preset, bf16_activations=True, change=change)
        return None

    def _keep_more_layers(self) -> Move | None:
        base = self.base()
        same = [t for t in self.trials if (t.move.preset, t.move.bf16_activations) == self._base_key()]
        kept_so_far = max((len(t.move.kept) for t in same), default=0)
        count = min(max(1, 2 * kept_so_far), len(self.ranking))
        if count <= kept_so_far:
            return None
        kept = tuple(entry["module"] for entry in self.ranking[:count])
        kept_at = kept_precision(get_preset(base.move.preset))
        if not self.within_cap(self.estimated_size(kept, kept_at)):
            return None
        precision = "at 8 bits" if kept_at == "int8" else "in bf16"
        change = f"{count} most sensitive {'layer' if count == 1 else 'layers'} kept {precision}"
        if base.move.bf16_activations:
            change += ", activations in bf16"
        return Move(
            preset=base.move.preset,
            kept=kept,
            bf16_activations=base.move.bf16_activations,
            kept_at=kept_at,
            change=change,
        )

    def _base_key(self) -> tuple[str, bool]:
        base = self.base().move
        return base.preset, base.bf16_activations

    def largest_kept(self) -> tuple[str, ...]:
        same = [t for t in self.trials if (t.move.preset, t.move.bf16_activations) == self._base_key()]
        return max((t.move.kept for t in same), key=len, default=())

    def _calibration_move(self) -> Move | None:
        base = self.base().move
        preset = PRESETS[base.preset]
        if not preset.needs_calibration:
            return None
        kept, tried = self.largest_kept(), [t.move for t in self.trials]
        kept_at = kept_precision(preset)
        # Both moves start from the base trial with the largest kept set so far.
        start = Move(preset=base.preset, kept=kept, bf16_activations=base.bf16_activations, kept_at=kept_at)
        kept_words = _kept_words(kept, kept_at)
        samples = min(2 * self.spec.calibration.samples, len(self.report.calibration_records))
        if samples > self.spec.calibration.samples and not any(m.samples for m in tried):
            change = f"{samples} calibration samples instead of {self.spec.calibration.samples}{kept_words}"
            return dataclasses.replace(start, samples=samples, change=change)
        if any(name == "SmoothQuantModifier" for name, _ in preset.modifiers):
            for strength in _SMOOTHING_STRENGTHS:
                if not any(m.smoothing == strength for m in tried):
                    change = f"SmoothQuant strength {strength:g}{kept_words}"
                    return dataclasses.replace(start, smoothing=strength, change=change)
        return None

    def summary(self, chosen: Trial) -> dict[str, Any]:
        floor = self.search.floor
        return {
            "kind": "floor search" if floor else "sweep",
            "floor": dataclasses.asdict(floor) if floor else None,
            "floor_percent": self.floor_percent,
            "floor_metric": self.floor_metric,
            "floor_words": FLOOR_METRICS[self.floor_metric],
            "task_baseline": self.task_baseline,
            "budget": dataclasses.asdict(self.search.budget),
            "presets": sweep_presets(self.spec),
            "baseline_size_bytes": self.size_before,
            "trials": [t.to_dict() for t in self.trials],
            "chosen": chosen.number,
            "met_floor": chosen.meets_floor,
            "stopped": self.stopped,
            "seconds": round(time.perf_counter() - self.started, 1),
            "sensitivity": self.ranking[:20],
            "sensitivity_probe": (
                f"each Linear's output error (compressed against original weights, same input) on "
                f"{_PROBE_SAMPLES} calibration samples of up to {_PROBE_TOKENS} tokens, trial 1's model"
            ),
        }


def _kept_words(kept: tuple[str, ...], kept_at: str) -> str:
    return f", with {len(kept)} layers kept {'at 8 bits' if kept_at == 'int8' else 'in bf16'}" if kept else ""


def prepare_search(spec: CompressionSpec, report: PreflightReport) -> CompressionSpec:
    """The search's spec as the pipeline (engine.runner) runs it: evaluated on the offline suite's windows at
    least (the floor is judged on them), with the calibration rows any preset of the sweep needs."""
    if not report.calibration_records and any(PRESETS[p].needs_calibration for p in sweep_presets(spec)):
        # The job's own preset is data-free, but a preset of the sweep calibrates: read its rows too.
        report.calibration_records = check_calibration(spec.calibration, True, load_hub=True)
    return dataclasses.replace(spec, evaluation=spec.evaluation or EvaluationSpec())


def search_checkpoint(run: Run) -> Checkpoint:
    """The step of engine.runner's pipeline that produces a search's checkpoint: the trials, as the module says,
    and the chosen one's files moved to the top of the staging folder."""
    spec, report = run.spec, run.report
    _weigh_trials(run.reporter, spec, report)
    state = _Search(spec, report, report.model.weights_bytes)
    chosen = _run_trials(state, run)
    _publish_trial(chosen, run.staging)
    return Checkpoint(
        spec=dataclasses.replace(spec, preset=chosen.move.preset),
        report=dataclasses.replace(report, recipe_yaml=chosen.recipe_yaml),
        layer_errors=chosen.layer_errors,
        settings={"search": state.summary(chosen)},
        evaluating="Evaluating baseline and the chosen checkpoint",
        done=f": trial {chosen.number} of {len(state.trials)}",
    )


def _weigh_trials(reporter: Reporter, spec: CompressionSpec, report: PreflightReport) -> None:
    """Progress: the compression stage holds every trial of the budget, each scored on the held-out windows."""
    stage = Stage.CALIBRATING if report.needs_calibration else Stage.COMPRESSING
    trials = (spec.search or SearchSpec()).budget.max_trials
    reporter.costs[stage] = trials * (reporter.costs.get(stage, 0.0) + _TRIAL_SCORE_S)


def _run_trials(state: _Search, run: Run) -> Trial:
    """Load once, score the baseline once, then run trials until next_move says stop; return the chosen one."""
    import torch
    from transformers import AutoTokenizer

    spec, report, reporter, timings, placement = state.spec, state.report, run.reporter, run.timings, run.placement
    evaluation = spec.evaluation
    started = time.perf_counter()
    reporter.emit(Stage.LOADING, "Loading the model (once for every trial)")
    loading = {"trust_remote_code": spec.trust_remote_code, "use_safetensors": not spec.allow_pickle}
    with placed_model(report.model.path, placement, **loading) as original:
        original.eval()
        tokenizer = AutoTokenizer.from_pretrained(report.model.path, trust_remote_code=spec.trust_remote_code)
        timings["load_s"] = time.perf_counter() - started
        state.linear_params = _quantized_linear_params(original, report)
        state.linear_widths = {n: m.in_features for n, m in original.named_modules() if isinstance(m, torch.nn.Linear)}
        state.device = placement.device
        with torch.no_grad():
            reference = heldout_scores(original, tokenizer, evaluation)
            if state.floor_metric == TASK_FLOOR:
                reporter.emit(Stage.LOADING, "Scoring the baseline on the floor's tasks (once for every trial)")
                tasks = runnable_tasks(evaluation)  # once: which tasks can run here does not change by trial
                state.task_baseline = _task_scores(original, tokenizer, state, evaluation, tasks)
        stage = Stage.CALIBRATING if report.needs_calibration else Stage.COMPRESSING
        while (move := state.next_move()) is not None:
            number = len(state.trials) + 1
            budget = state.search.budget.max_trials
            reporter.emit(stage, f"Trial {number} of at most {budget}: {move.change}", within=(number - 1) / budget)
            trial = _run_trial(number, move, original, tokenizer, reference, state, run)
            state.trials.append(trial)
            tasks = "" if trial.task_recovery is None else f", task recovery {trial.task_recovery:.2f} %"
            reporter.log(
                f"{TRIAL_LINE}{number}: {move.change}: {size_text(trial.size_bytes)}, "
                f"perplexity recovery {trial.recovery:.2f} %{tasks}" + _floor_words(trial)
            )
            _drop_unchosen_folders(state)
        timings["search_s"] = time.perf_counter() - started
    gc.collect()
    chosen = state.chosen()
    if chosen is None:
        raise EngineError("The search ran no trial (its budget allows none).", field="search")
    return chosen


def _floor_words(trial: Trial) -> str:
    if trial.meets_floor is None:
        return ""
    return ": meets the floor" if trial.meets_floor else ": below the floor"


def _run_trial(number, move, original, tokenizer, reference, state: _Search, run: Run) -> Trial:
    """Compress a copy of the original weights as `move` says (the run's own steps: data-parallel where the plan
    says, resuming from the layers an interrupted run of this trial kept), score it, save it under
    staging/.trials/N."""

    started = time.perf_counter()
    recipe = trial_recipe(move, state.linear_widths, ignore_indivisible=state.spec.ignore_indivisible)
    report = dataclasses.replace(state.report, recipe_yaml=recipe)
    calibration = dataclasses.replace(state.spec.calibration, samples=move.samples or state.spec.calibration.samples)
    dataset = None
    if PRESETS[move.preset].needs_calibration:
        dataset = calib.tokenize_records(state.report.calibration_records, tokenizer, calibration)
    # Each trial keeps its own layers: a search run again after an interruption redoes no finished trial's work.
    resume_dir = run.resume_dir / f"trial-{number}" if run.resume_dir is not None else None
    folder = run.staging / ".trials" / str(number)
    layer_reporter = Reporter(None, run.reporter.should_cancel)
    if run.plan.data_parallel > 1 and dataset is not None:
        layer_reporter.layer_errors = run.compress_data_parallel(report, calibration, dataset, folder, resume_dir)
        loading = {"trust_remote_code": state.spec.trust_remote_code}
        with placed_model(folder, run.placement, **loading) as model:
            scores, task_scores = _score_trial(model, original, tokenizer, reference, state, run.spec.evaluation)
    else:
        model = copy.deepcopy(original)  # the original weights stay untouched for the next trial
        with (
            _cancel_checks(model, run.reporter),
            layer_error_hooks(model, layer_reporter),
            run.resumable(model, report, dataset, layer_reporter, resume_dir),
        ):
            run_oneshot(model, tokenizer, report, state.spec, dataset, run.reporter)
        scores, task_scores = _score_trial(model, original, tokenizer, reference, state, run.spec.evaluation)
        model.save_pretrained(folder, save_compressed=True)
    tokenizer.save_pretrained(folder)
    (folder / "recipe.yaml").write_text(recipe)
    del model
    gc.collect()
    recovery = 100.0 * reference["perplexity"] / scores["perplexity"]
    task_recovery = _task_recovery(task_scores, state.task_baseline) if task_scores else None
    return Trial(
        number=number,
        move=move,
        recipe_yaml=recipe,
        size_bytes=weights_bytes(folder),
        perplexity=scores["perplexity"],
        recovery=recovery,
        kl=scores["kl"],
        top1_agreement=scores["top1_agreement"],
        seconds=time.perf_counter() - started,
        meets_floor=state.meets(recovery if task_recovery is None else task_recovery),
        layer_errors=layer_reporter.layer_errors,
        folder=folder,
        task_recovery=task_recovery,
        task_scores=task_scores,
    )


def _score_trial(model, original, tokenizer, reference, state: _Search, evaluation: EvaluationSpec):
    """A trial's compressed model scored on the held-out windows (and the floor's tasks); the first trial's also
    ranks the layers by sensitivity."""
    import torch

    model.eval()
    with torch.no_grad():
        scores = heldout_scores(model, tokenizer, evaluation, reference)
        tasks = list(state.task_baseline)
        task_scores = _task_scores(model, tokenizer, state, evaluation, tasks) if tasks else {}
        if not state.ranking:
            state.ranking = _sensitivity(model, original, tokenizer, state)
    return scores, task_scores


def _task_scores(model, tokenizer, state: _Search, evaluation: EvaluationSpec, tasks: list[str]) -> dict[str, float]:
    """Each of the evaluation's tasks scored on a model in memory (percent); every trial sees the same items."""
    return {task: task_score_in_memory(model, tokenizer, state.device, task, evaluation)["value"] for task in tasks}


def _task_recovery(scores: dict[str, float], baseline: dict[str, float]) -> float:
    """The tasks' average recovery in percent; a task the baseline scores 0 on counts as kept (nothing to lose)."""
    recoveries = [recovery_percent(baseline[task], score, higher_is_better=True) for task, score in scores.items()]
    return sum(100.0 if value is None else value for value in recoveries) / len(recoveries)


def trial_recipe(move: Move, linear_widths: dict[str, int], *, ignore_indivisible: bool) -> str:
    """The plain llm-compressor recipe of one trial: the preset (SmoothQuant strength as the move says) with
    the layers its group size cannot divide in `ignore`, and the kept layers in `ignore` too (bf16) or in an
    8-bit config group of their own."""
    preset = get_preset(move.preset)
    if move.smoothing is not None:
        preset = _with_smoothing(preset, move.smoothing)
    if move.bf16_activations:
        preset = weights_only(preset) or preset
    preset, indivisible = fit_preset(preset, header_layers(linear_widths), ignore_indivisible)
    if move.kept and move.kept_at == "int8":
        return _with_eight_bit_layers(preset, sorted(set(move.kept) - set(indivisible))).recipe_yaml(indivisible)
    return preset.recipe_yaml(sorted({*indivisible, *move.kept}))


def _config_groups(args: dict[str, Any]) -> dict[str, Any] | None:
    """A quantizing modifier's config groups; a named scheme ("W4A16") becomes its one group."""
    from compressed_tensors.quantization import preset_name_to_scheme

    if isinstance(args.get("scheme"), str):
        scheme = preset_name_to_scheme(args["scheme"], list(args.get("targets") or ["Linear"]))
        return {"group_0": _plain(scheme.model_dump(mode="json", exclude_none=True))}
    return args.get("config_groups")


def kept_precision(preset: Preset) -> str:
    """How a search keeps a preset's most sensitive layers: at 8 bits inside a 4-bit integer weight scheme
    (most of the quality back at half the cost of bf16), else in bf16."""
    for _name, args in preset.modifiers:
        for group in (_config_groups(args) or {}).values():
            weights = group.get("weights") or {}
            if weights.get("num_bits") == 4 and weights.get("type", "int") == "int":
                return "int8"
    return "bf16"


def _with_eight_bit_layers(preset: Preset, layers: list[str]) -> Preset:
    """The preset with `layers` in a config group of their own: the 4-bit group's weights at 8 bits. An exact
    layer name outranks the "Linear" target in compressed-tensors' matching, so these layers take this group."""
    modifiers = []
    for name, args in preset.modifiers:
        groups = _config_groups(args)
        if not groups:
            modifiers.append((name, args))
            continue
        four_bit = next(g for g in groups.values() if (g.get("weights") or {}).get("num_bits") == 4)
        eight_bit = {**four_bit, "targets": list(layers), "weights": {**four_bit["weights"], "num_bits": 8}}
        config_groups = {**groups, "kept_at_8_bits": eight_bit}
        modifiers.append((name, {**{k: v for k, v in args.items() if k != "scheme"}, "config_groups": config_groups}))
    return dataclasses.replace(preset, modifiers=tuple(modifiers))


def weights_only(preset: Preset) -> Preset | None:
    """The preset with its weights quantized as it says and its activations left unquantized (bf16); None
    when it quantizes no activations. A named scheme becomes its weights' config group."""
    changed = False
    modifiers = []
    for name, args in preset.modifiers:
        groups = _config_groups(args)
        if not groups or not any(group.get("input_activations") for group in groups.values()):
            modifiers.append((name, args))
            continue
        changed = True
        weights = {key: {k: v for k, v in group.items() if k != "input_activations"} for key, group in groups.items()}
        modifiers.append((name, {**{k: v for k, v in args.items() if k != "scheme"}, "config_groups": weights}))
    if not changed:
        return None
    activations = "none: kept in bf16 (a search move)"
    return dataclasses.replace(preset, modifiers=tuple(modifiers), activation_quantization=activations)


def _plain(value: Any) -> Any:
    """A dumped scheme without its empty and None fields (the recipe says only what it sets)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items() if item not in (None, {}, [])}
    return value


def _with_smoothing(preset: Preset, strength: float) -> Preset:
    modifiers = tuple(
        (name, {**args, "smoothing_strength": strength} if name == "SmoothQuantModifier" else args)
        for name, args in preset.modifiers
    )
    return dataclasses.replace(preset, modifiers=modifiers)


@contextmanager
def _cancel_checks(model, reporter: Reporter) -> Iterator[None]:
    """A cancel stops a trial at its next decoder layer (a long GPTQ trial never runs to its end first)."""
    layers = getattr(getattr(model, "model", model), "layers", None) or []
    handles = [layer.register_forward_pre_hook(lambda *_: reporter.check_cancel()) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _sensitivity(compressed, original, tokenizer, state: _Search) -> list[dict[str, Any]]:
    """Rank the quantized Linear layers by their own output error on a few calibration samples: each one's
    output in the compressed model against the original weights applied to the same input (so weight and
    activation quantization both count, and the error already passed on by earlier layers does not)."""
    import torch

    originals = dict(original.named_modules())
    errors: dict[str, float] = {}

    def hook_for(name: str):
        def hook(module, args, output):
            reference = originals[name]
            expected = torch.nn.functional.linear(args[0], reference.weight, reference.bias)
            errors[name] = errors.get(name, 0.0) + (output.float() - expected.float()).pow(2).mean().item()

        return hook

    handles = [
        module.register_forward_hook(hook_for(name))
        for name, module in compressed.named_modules()
        if name in state.linear_params
    ]
    try:
        for ids in _probe_inputs(state, tokenizer):
            compressed(ids.to(compressed.device)[None])
    finally:
        for handle in handles:
            handle.remove()
    gptq = {entry["module"]: entry["error"] for entry in state.trials[0].layer_errors} if state.trials else {}
    ranked = sorted(errors.items(), key=lambda item: item[1], reverse=True)
    return [{"module": name, "output_error": error, "layer_error": gptq.get(name)} for name, error in ranked]


def _probe_inputs(state: _Search, tokenizer):
    import torch

    records = state.report.calibration_records or calib.builtin_records(_PROBE_SAMPLES)
    spec = CalibrationSpec(samples=_PROBE_SAMPLES, max_seq_len=_PROBE_TOKENS)
    return [torch.tensor(row) for row in calib.tokenize_records(records, tokenizer, spec)["input_ids"]]


def _quantized_linear_params(model, report: PreflightReport) -> dict[str, int]:
    """Each Linear the recipe quantizes (not in its ignore list), with its weight's parameter count."""
    import torch

    from engine.presets import recipe_ignore

    ignored = recipe_ignore(report.recipe_yaml)
    return {
        name: module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name not in ignored and name.split(".")[-1] not in ignored
    }


def _drop_unchosen_folders(state: _Search) -> None:
    """Keep only the chosen trial's checkpoint on disk: a long search never holds more than two."""
    chosen = state.chosen()
    for trial in state.trials:
        if trial is not chosen and trial.folder is not None:
            shutil.rmtree(trial.folder, ignore_errors=True)
            trial.folder = None


def _publish_trial(chosen: Trial, staging: Path) -> None:
    """Move the chosen trial's files to the checkpoint's top and remove the trials' folder."""
    for path in chosen.folder.iterdir():
        path.rename(staging / path.name)
    shutil.rmtree(staging / ".trials", ignore_errors=True)
