"""A floor search's or a sweep's trials (results.settings.search, engine.search) as the pages show them: the
job page's table of trials, and compare's size-versus-quality frontier with the recommendation for a floor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from frontend.presentation import _number


@dataclass
class TrialPoint:
    """One trial (or one job's checkpoint) on the size-versus-quality plane."""

    label: str
    size_bytes: int
    recovery: float | None
    change: str = ""
    job_id: int | None = None
    number: int | None = None
    chosen: bool = False


def request_text(search: Any) -> str:
    """A job's search request in words: "floor 99 % perplexity recovery; also tries w8a16-gptq; at most 6 trials"."""
    if not isinstance(search, dict):
        return ""
    floor, budget = search.get("floor") or {}, search.get("budget") or {}
    at_least = _number(floor.get("at_least"))
    metric = "task recovery" if floor.get("metric") == "task_recovery" else "perplexity recovery"
    parts = [f"floor {100 * at_least:g} % {metric}" if at_least is not None else "a sweep, no floor"]
    if search.get("presets"):
        parts.append(f"also tries {', '.join(map(str, search['presets']))}")
    limits = [f"at most {budget.get('max_trials')} trials"]
    if budget.get("max_seconds"):
        limits.append(f"{budget['max_seconds']:g} s")
    if budget.get("max_size_ratio"):
        limits.append(f"{100 * budget['max_size_ratio']:g} % of the original size")
    return "; ".join([*parts, ", ".join(limits)])


def search_of(results: Any) -> dict[str, Any] | None:
    """The search's record in a job's results, or None for a plain job (or malformed results)."""
    settings = results.get("settings") if isinstance(results, dict) else None
    search = settings.get("search") if isinstance(settings, dict) else None
    return search if isinstance(search, dict) and isinstance(search.get("trials"), list) else None


def trial_points(job_id: int, results: Any) -> list[TrialPoint]:
    """Each trial of a job's search as a point labelled "#job tN"."""
    search = search_of(results)
    if search is None:
        return []
    points = []
    for trial in search["trials"]:
        size = _number(trial.get("size_bytes"))
        if size is None:
            continue
        points.append(
            TrialPoint(
                label=f"#{job_id} t{trial.get('number')}",
                size_bytes=int(size),
                recovery=_number(trial.get("recovery")),
                change=f"{trial.get('preset', '')}: {trial.get('change', '')}",
                job_id=job_id,
                number=trial.get("number"),
                chosen=trial.get("number") == search.get("chosen"),
            )
        )
    return points


def frontier(points: list[TrialPoint]) -> list[TrialPoint]:
    """The points no other point beats on both size and recovery, from the smallest up."""
    ranked = sorted((p for p in points if p.recovery is not None), key=lambda p: (p.size_bytes, -p.recovery))
    best: list[TrialPoint] = []
    for point in ranked:
        if not best or point.recovery > best[-1].recovery:
            best.append(point)
    return best


def recommendation(points: list[TrialPoint], floor_percent: float | None) -> TrialPoint | None:
    """The smallest point whose recovery keeps the floor (None: no floor, or none keeps it)."""
    if floor_percent is None:
        return None
    meeting = [p for p in points if p.recovery is not None and p.recovery >= floor_percent - 1e-9]
    return min(meeting, key=lambda p: (p.size_bytes, -p.recovery), default=None)
