"""Turn a job's stored results and progress into what the pages show.

Job.results is written by the worker and grows over time (sizes, per-layer errors, an evaluation with
metrics and generations). Everything here reads it defensively: a missing or malformed key means the
section is simply not shown, never an error page.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.utils import timezone

# The stages a job goes through, in order (jobs.models.Job.Stage without "done", which ends the run).
STAGE_ORDER = ("waiting", "loading", "calibrating", "compressing", "saving", "evaluating")
STAGE_LABELS = {
    "waiting": "Queued",
    "loading": "Loading",
    "calibrating": "Calibrating",
    "compressing": "Compressing",
    "saving": "Saving",
    "evaluating": "Evaluating",
}


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
    """Recovery in percent: the stored value (a ratio such as 0.99 or a percentage such as 99.0), or
    computed from baseline and compressed, the way the seed cards do it."""
    stored = _number(metric.get("recovery"))
    if stored is not None:
        return stored * 100 if abs(stored) <= 2 else stored
    baseline, compressed = _number(metric.get("baseline")), _number(metric.get("compressed"))
    if baseline is None or compressed is None or baseline == 0 or compressed == 0:
        return None
    if metric.get("higher_is_better", True):
        return 100 * compressed / baseline
    return 100 * baseline / compressed


@dataclass
class MetricRow:
    name: str
    label: str
    baseline: float | None
    compressed: float | None
    recovery: float | None
    higher_is_better: bool
    unit: str = ""


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
            )
        )
    return rows


def headline_recovery(results: Any) -> float | None:
    """The recovery shown in the jobs list: the evaluation's "headline" metric, else its first one."""
    evaluation = evaluation_of(results)
    rows = [row for row in metric_rows(results) if row.recovery is not None]
    if not rows:
        return None
    headline = evaluation.get("headline")
    for row in rows:
        if headline and row.name == headline:
            return row.recovery
    return rows[0].recovery


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


def timings(results: Any) -> list[tuple[str, float]]:
    if not isinstance(results, dict) or not isinstance(results.get("timings"), dict):
        return []
    names = {"load_s": "Load", "compress_s": "Compress", "save_s": "Save", "hash_s": "Hash", "evaluate_s": "Evaluate"}
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
    state: str  # "done", "current", "failed", "pending", "skipped"
    started: datetime | None
    ended: datetime | None

    @property
    def seconds(self) -> float | None:
        if self.started is None:
            return None
        end = self.ended or timezone.now()
        return max(0.0, (end - self.started).total_seconds())


def timeline(job, stage_started: dict[str, datetime]) -> list[TimelineStep]:
    """The stages with when each began and ended (from the first log line of each stage)."""
    starts = dict(stage_started)
    starts["waiting"] = job.created_at
    if job.started_at:
        starts["loading"] = min(job.started_at, starts.get("loading", job.started_at))
    current = job.stage if job.stage in STAGE_ORDER else None
    seen = [key for key in STAGE_ORDER if key in starts]
    steps: list[TimelineStep] = []
    for key in STAGE_ORDER:
        started = starts.get(key)
        later = [starts[k] for k in STAGE_ORDER[STAGE_ORDER.index(key) + 1 :] if k in starts]
        ended = min(later) if later else (job.finished_at if started else None)
        if started is None:
            reached_later = any(STAGE_ORDER.index(k) > STAGE_ORDER.index(key) for k in seen)
            state = "skipped" if reached_later or job.status == "succeeded" else "pending"
        elif job.status in ("queued", "running") and key == current:
            state, ended = "current", None
        elif job.status in ("failed", "cancelled") and key == (seen[-1] if seen else None):
            state = "failed"
        else:
            state = "done"
        steps.append(TimelineStep(key=key, label=STAGE_LABELS[key], state=state, started=started, ended=ended))
    return steps


def seconds_left(job, stage_started: dict[str, datetime]) -> float | None:
    """Time left in the current stage: the time per step so far times the steps left."""
    if job.status != "running" or not job.step or not job.total or job.step >= job.total:
        return None
    began = stage_started.get(job.stage)
    if began is None:
        return None
    elapsed = (timezone.now() - began).total_seconds()
    if elapsed <= 0:
        return None
    return elapsed / job.step * (job.total - job.step)


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
