"""Shared pieces of the benchmark harness: figures, statistics, the bench's environment and machine facts."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "var" / "bench"
DATA_DIR = BENCH_DIR / "data"
LOG_DIR = BENCH_DIR / "logs"
RESULTS_DIR = REPO / "bench" / "results"
MODEL_STORE = REPO / "var" / "models"
PYTHON = REPO / ".venv" / "bin" / "python"
DB_NAME = os.environ.get("BENCH_DB_NAME", "bench_compressor")
PG_URL = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432")
# Each run publishes under its own Redis key prefix: other engineers' workers never see the bench's jobs.
KEY_PREFIX = f"bench-{os.getpid()}:"


def bench_env() -> dict[str, str]:
    """The environment of the bench's web server, worker and in-process Django (its own data and DB)."""
    return {
        "DJANGO_SETTINGS_MODULE": "compressor_app.settings",
        "COMPRESSOR_DATA_DIR": str(DATA_DIR),
        "COMPRESSOR_MODEL_STORE": str(MODEL_STORE),
        "DATABASE_URL": f"{PG_URL}/{DB_NAME}",
        "CELERY_KEY_PREFIX": KEY_PREFIX,
        # The cache's keys too (rate windows, files found intact): under the default prefix, the bench user's
        # thousands of submissions counted toward user 1 of every other checkout on this Redis (make demo's).
        "COMPRESSOR_CACHE_PREFIX": KEY_PREFIX.rstrip(":"),
        "DJANGO_ENV": "development",
        # 200 submissions in a burst: the per-user creation throttle and active-jobs quota would refuse most.
        "COMPRESSOR_JOB_CREATE_RATE": "1000000/hour",
        "COMPRESSOR_USER_MAX_ACTIVE_JOBS": "1000000",
        # The dashboard part's 10 000 succeeded jobs "store" about 1.2 TB: over the 500 GB quota of later parts.
        "COMPRESSOR_USER_MAX_STORED_BYTES": str(10**15),
        # memory_1b submits its random 1 B model as a folder under var/bench/models.
        "COMPRESSOR_ALLOW_LOCAL_PATHS": "True",
        "DJANGO_DEBUG": "False",
        "PYTHONUNBUFFERED": "1",
    }


@dataclass
class Figure:
    """One row of the table: what was measured against its target."""

    part: str
    name: str
    target: str
    measured: str
    ratio: float | None = None
    verdict: str = "info"  # met | missed | info | n/a | error
    details: list[str] = field(default_factory=list)

    @property
    def ratio_text(self) -> str:
        return "-" if self.ratio is None else f"{self.ratio:.2f}"


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def error_figure(part: str, exc: BaseException) -> Figure:
    """A row saying the part could not run: the exception's first line and its last line (the cause)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return Figure(part, f"{part} (failed to run)", "-", f"{type(exc).__name__}: {text}"[:240], verdict="error")


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else math.nan


def percentile(values: Iterable[float], pct: float) -> float:
    """Nearest-rank percentile (p95 of 200 samples is the 190th smallest)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


def machine_info() -> dict[str, str]:
    import psutil

    try:
        uname = subprocess.run(["uname", "-a"], capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        uname = platform.platform()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "uname -a": uname,
        "nproc": str(os.cpu_count()),
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "load average at start": load,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
    }


def table(figures: list[Figure]) -> list[str]:
    """The figures as a Markdown table (bench/results)."""
    rows = [("figure", "target", "measured", "ratio", "verdict")]
    rows += [(f.name, f.target, f.measured, f.ratio_text, f.verdict) for f in figures]
    return (
        [f"| {' | '.join(cell.replace('|', '/') for cell in row)} |" for row in rows[:1]]
        + ["|" + "|".join(["---"] * 5) + "|"]
        + [f"| {' | '.join(cell.replace('|', '/') for cell in row)} |" for row in rows[1:]]
    )


def plain_table(figures: list[Figure]) -> str:
    """The figures as a plain-text table (the terminal)."""
    rows = [("figure", "target", "measured", "ratio", "verdict")]
    rows += [(f.name, f.target, f.measured, f.ratio_text, f.verdict) for f in figures]
    widths = [min(70, max(len(r[i]) for r in rows)) for i in range(5)]
    lines = []
    for index, row in enumerate(rows):
        lines.append(" | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)))
        if index == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)
