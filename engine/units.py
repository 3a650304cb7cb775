"""The units of the figures a job reports and how they are written, in one place.

The model card, the job page, the jobs list and compare all write sizes and recoveries with these, so
one figure reads the same on every screen. Sizes are decimal (1 MB = 10^6 bytes, as model cards and
the hub write them); recovery is always stored and shown as a percentage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NO_VALUE = "—"

RECOVERY_DEFINITION = (
    "Recovery is the compressed model's score as a percentage of the baseline's (compressed / baseline for "
    "accuracies, baseline / compressed for perplexity): 100 % means nothing was lost. It is given only for "
    "metrics each model scores on its own; KL divergence and top-1 agreement already compare the compressed "
    "model with the baseline, so they have none (—)."
)


def recovery_percent(baseline: float | None, compressed: float | None, *, higher_is_better: bool) -> float | None:
    """Compressed relative to baseline in percent (100 = no loss), for either direction of metric."""
    if baseline is None or compressed is None:
        return None
    if higher_is_better:
        return 100.0 * compressed / baseline if baseline else None
    return 100.0 * baseline / compressed if compressed else None


def has_recovery(metric: Mapping[str, Any]) -> bool:
    """Whether recovery means something for this metric: perplexity and task scores, not KL or agreement."""
    return bool(metric.get("task")) or metric.get("name") == "perplexity"


def recovery_name(metric: Mapping[str, Any]) -> str:
    """What a headline recovery is of, for a column heading: "Perplexity recovery"."""
    if metric.get("name") == "average":
        return "Task average recovery"
    label = str(metric.get("label") or metric.get("name") or "")
    return f"{label.split(' (')[0]} recovery"


def percent_text(value: float | None, digits: int = 1) -> str:
    """99.234 -> "99.2 %"; None -> "—"."""
    if value is None:
        return NO_VALUE
    return f"{value:.{digits}f} %"


def size_text(num_bytes: float | None) -> str:
    """Bytes in decimal units: 163_200_000 -> "163.2 MB", 2_690_000_000 -> "2.69 GB"."""
    if num_bytes is None:
        return NO_VALUE
    if num_bytes >= 1e9:
        return f"{num_bytes / 1e9:.2f} GB"
    if num_bytes >= 1e6:
        return f"{num_bytes / 1e6:.1f} MB"
    if num_bytes >= 1e3:
        return f"{num_bytes / 1e3:.1f} kB"
    return f"{int(num_bytes)} B"


def duration_text(seconds: float | None) -> str:
    """Seconds as a person reads them, parts that are zero left out: 42 -> "42 s", 245 -> "4 min 05 s",
    600 -> "10 min", 3720 -> "1 h 02 min", 21600 -> "6 h" (seconds are left out past an hour); None -> ""."""
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s" if seconds else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if minutes else f"{hours} h"


def vllm_where(run: dict | None) -> str:
    """Where vLLM ran (engine.evaluation's record of a vllm-backend run, or a check in vLLM), to follow "in vLLM":
    " on the CPU", ", tensor parallel over 8 GPUs", or nothing for one GPU or a result without the record."""
    if not isinstance(run, dict):
        return ""
    on_cpu = run.get("device") == "cpu"
    where = " on the CPU" if on_cpu else ""
    ranks = run.get("tensor_parallel_size")
    if isinstance(ranks, int) and ranks > 1:
        where += f", tensor parallel over {ranks} {'CPU ranks' if on_cpu else 'GPUs'}"
    return where
