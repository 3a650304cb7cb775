"""Part 3, API throughput: N job submissions at concurrency C over loopback, with token auth.

Each submission is a job preflight accepts (fp8-dynamic on the built-in model, force=true so none is
answered by deduplication). No worker runs meanwhile: the jobs stay queued and are cancelled (and the bench's
Redis keys purged) afterwards. Checked: every request answered 201 once, the returned ids are distinct, and the
database holds exactly those new rows (none lost, none duplicated).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psutil

from bench.common import Figure, median, percentile, verdict
from bench.stack import Stack, purge_redis

PAYLOAD = {"preset": "fp8-dynamic", "force": True}


def run(stack: Stack, *, total: int = 200, concurrency: int = 20) -> list[Figure]:
    stack.stop_worker()
    burst = submit_burst(stack, PAYLOAD, total=total, concurrency=concurrency)
    latencies, statuses, ids, db_ids = burst.latencies, burst.statuses, burst.ids, burst.db_ids
    first_s, wall, errors, purged = burst.first_s, burst.wall_s, burst.errors, burst.purged
    duplicates = len(ids) - len(set(ids))
    lost = set(ids) - db_ids
    extra = db_ids - set(ids)
    ok = statuses.get(201, 0) == total and duplicates == 0 and not lost and not extra and len(db_ids) == total

    med, p95 = median(latencies), percentile(latencies, 95)
    details = [
        f"{total} POST /api/v1/jobs/ from {concurrency} threads in {wall:.1f} s = {total / wall:.1f} submissions/s "
        f"(each runs the submission check in the web process); first submission after start {first_s:.2f} s",
        f"status codes: {statuses}; ids returned {len(ids)}, distinct {len(set(ids))}; new DB rows {len(db_ids)}; "
        f"lost {len(lost)}, duplicated {duplicates}, unexpected rows {len(extra)}",
        f"latency min {min(latencies) * 1000:.0f} ms, median {med * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
        f"max {max(latencies) * 1000:.0f} ms; afterwards {purged} Redis keys of the bench purged",
        burst.cpu_text(),
    ]
    if errors:
        details.append(f"first errors: {errors}")
    return [
        Figure(
            "throughput",
            f"API: {total} submissions at concurrency {concurrency}",
            "each accepted exactly once",
            f"{statuses.get(201, 0)}/{total} accepted, {len(db_ids)} rows, {duplicates} dup, {len(lost)} lost",
            None,
            verdict(ok),
            details,
        ),
        Figure(
            "throughput",
            "API: submission latency median / p95",
            "report",
            f"{med * 1000:.0f} ms / {p95 * 1000:.0f} ms ({total / wall:.1f} jobs/s)",
            None,
            "info",
        ),
    ]


@dataclass
class Burst:
    """What a burst of submissions got back, and the rows it left (cancelled and purged afterwards)."""

    latencies: list[float]
    statuses: dict[int, int]
    ids: list[int]
    db_ids: set[int]
    errors: list[str]
    first_s: float
    wall_s: float
    purged: int
    cpu_s: dict[str, float]  # CPU seconds per submission of the timed burst, by process group

    def cpu_text(self) -> str:
        return "CPU per submission: " + ", ".join(f"{name} {s * 1000:.1f} ms" for name, s in self.cpu_s.items())


def _processes(stack: Stack) -> dict[str, list[psutil.Process]]:
    """The processes that share the machine's cores during a burst, by what they are."""
    web = psutil.Process(stack.web.pid)
    named = {"PostgreSQL": [], "Redis": [], "local hub": []}
    for proc in psutil.process_iter(["name", "cmdline"]):
        name = proc.info["name"] or ""
        if name.startswith("postgres"):
            named["PostgreSQL"].append(proc)
        elif name.startswith("redis-server"):
            named["Redis"].append(proc)
        elif "bench.hub_process" in (proc.info["cmdline"] or []):
            named["local hub"].append(proc)
    return {"web server": [web, *web.children(recursive=True)], "bench (clients)": [psutil.Process()], **named}


def _cpu_seconds(processes: dict[str, list[psutil.Process]]) -> dict[str, float]:
    spent: dict[str, float] = {}
    for name, group in processes.items():
        spent[name] = 0.0
        for proc in group:
            try:
                times = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            spent[name] += times.user + times.system
    return spent


def submit_burst(stack: Stack, payload: dict, *, total: int, concurrency: int) -> Burst:
    """One submission first (the web process's first request imports what requests need), one untimed round at
    the burst's concurrency (every server process warm), then `total` submissions of `payload` from
    `concurrency` threads; the jobs are cancelled and Redis purged after."""
    from jobs.models import Job

    t0 = time.perf_counter()
    marker = stack.api.submit(payload)["id"]
    first_s = time.perf_counter() - t0
    local = threading.local()

    def submit(index: int) -> tuple[int, float, int | None, str]:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = stack.api.new_session()
        started = time.perf_counter()
        try:
            response = session.post(stack.api.url("/api/v1/jobs/"), json=payload, timeout=120)
        except Exception as exc:  # noqa: BLE001 - counted as a failure
            return 0, time.perf_counter() - started, None, str(exc)[:200]
        elapsed = time.perf_counter() - started
        job_id = response.json().get("id") if response.status_code in (200, 201) else None
        return response.status_code, elapsed, job_id, "" if job_id else response.text[:200]

    # Then one round at the burst's concurrency, untimed: each process and thread of the server has served a
    # submission (its first one imports what the rest reuse), so the timed burst is the steady state.
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        warm_ids = [job_id for _status, _s, job_id, _e in pool.map(submit, range(concurrency), timeout=900)]
    last_untimed = max([marker, *(job_id for job_id in warm_ids if job_id)])
    processes = _processes(stack)
    cpu0 = _cpu_seconds(processes)
    wall0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(submit, range(total), timeout=900))
    wall = time.perf_counter() - wall0
    cpu = {name: (spent - cpu0[name]) / total for name, spent in _cpu_seconds(processes).items()}
    statuses: dict[int, int] = {}
    for status, *_rest in results:
        statuses[status] = statuses.get(status, 0) + 1
    db_ids = set(Job.objects.filter(pk__gt=last_untimed).values_list("pk", flat=True))
    # Clean up: the jobs were only for the API; no worker will ever run them.
    Job.objects.filter(pk__gte=marker, status=Job.Status.QUEUED).update(
        status=Job.Status.CANCELLED, message="bench: cancelled after a submission burst"
    )
    return Burst(
        latencies=[r[1] for r in results],
        statuses=statuses,
        ids=[r[2] for r in results if r[2] is not None],
        db_ids=db_ids,
        errors=[r[3] for r in results if r[3]][:3],
        first_s=first_s,
        wall_s=wall,
        cpu_s=cpu,
        purged=purge_redis(),
    )
