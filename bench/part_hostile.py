"""Hostile input (issue 30): the web process's CPU seconds per request over the hostile set, the worst of them
against the target of under 1 s.

The set, replayed over loopback against a gunicorn web server of the part's own with the default settings (as
deployed; no worker runs, the jobs stay queued):
- a calibration upload of 10,000,000 short rows (130 MB, under the 200 MiB byte cap): refused past the row cap;
- an upload of 500,000 rows, the most the default cap stores, then three submissions naming it (each read the
  whole file before);
- JSON nested 100,000 deep on the job endpoint and on PUT /api/v1/hub-token/;
- recipes with an integer of 5,000 digits and with a sexagesimal float too large for a float;
- a recipe whose `ignore` holds patterns that backtrack for hours under Python's re;
- the first submission after the start that names an lm-eval task (the task index).

The web process's CPU is read from /proc (psutil: the gunicorn arbiter and its workers, user + system) before
and after each request; requests go one at a time, after warm-up requests have loaded each worker's views.

Run alone: `BENCH_DB_NAME=bench_hostile .venv/bin/python -m bench.part_hostile` (writes
bench/results/hostile.md); or as part of `bench/run.py --part hostile`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, Figure, bench_env, machine_info, verdict  # noqa: E402
from bench.stack import Api, Process, Stack, free_port, gunicorn_argv  # noqa: E402
from tests.support import wait_until  # noqa: E402

TARGET_CPU_S = 1.0
STORED_ROWS = 500_000  # the most rows the default cap (COMPRESSOR_MAX_UPLOAD_ROWS) stores
ROW = b'{"text":"a"}\n'
# Python's re backtracks on these for hours against a module name of 30 characters (tests/security too).
CATASTROPHIC = ["re:(a+)+$", "re:(.*a){25}", r"re:([\w.]+)+!"]


def _recipe(modifier: str) -> str:
    return f"compression_stage:\n  compression_modifiers:\n    {modifier}\n"


@dataclass
class Case:
    name: str
    cpu_s: float
    wall_s: float
    status: int


def web_cpu_s(web: Process) -> float:
    """User + system CPU seconds of the web server: the gunicorn arbiter and all its workers."""
    import psutil

    root = psutil.Process(web.pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def _measure(cases: list[Case], web: Process, name: str, send):
    """Send one request, add its case to `cases`, return the response."""
    before, started = web_cpu_s(web), time.perf_counter()
    response = send()
    wall = time.perf_counter() - started
    cases.append(Case(name, web_cpu_s(web) - before, wall, response.status_code))
    return response


def _upload(api: Api, rows: int, name: str):
    return api.post("/api/v1/calibration-datasets/", files={"file": (f"{name}.jsonl", ROW * rows)}, timeout=600)


def _on_web(token: str, env: dict[str, str], replay) -> list[Case]:
    """replay(api, web) against a gunicorn web server of its own with these settings, stopped after."""
    port = free_port()
    web = Process("web-hostile", gunicorn_argv(port), {**bench_env(), **env})
    api = Api(f"http://127.0.0.1:{port}", token)
    try:
        ready = lambda: api.get("/api/v1/presets/", timeout=5).status_code == 200  # noqa: E731
        wait_until(ready, timeout=90, what="the hostile part's web server", not_yet=(OSError,))
        _warm_up(api)
        return replay(api, web)
    finally:
        web.stop()


def run(stack: Stack) -> list[Figure]:
    cases = _on_web(stack.token, {}, _replay)
    worst = max(cases, key=lambda case: case.cpu_s)
    details = [
        f"{case.name}: {case.cpu_s:.2f} s of CPU, {case.wall_s:.2f} s wall, HTTP {case.status}" for case in cases
    ]
    return [
        Figure(
            "hostile",
            "Hostile set: worst web-process CPU per request",
            f"< {TARGET_CPU_S:.0f} s",
            f"{worst.cpu_s:.2f} s ({worst.name})",
            worst.cpu_s / TARGET_CPU_S,
            verdict(worst.cpu_s < TARGET_CPU_S),
            details,
        )
    ]


DATA_FREE = {"preset": "fp8-dynamic", "calibration": {"kind": "none"}, "force": True}


def _warm_up(api: Api) -> None:
    """Requests not measured: each gunicorn worker loads the views and the submission check on first use."""
    for _ in range(4):
        api.get("/api/v1/presets/")
        api.post("/api/v1/jobs/", json=DATA_FREE)
        _upload(api, 100, "warm-up")


def _replay(api: Api, web: Process) -> list[Case]:
    """The hostile set against a web server with the default settings."""

    def submit(body: dict):
        return lambda: api.post("/api/v1/jobs/", json={**body, "force": True})

    cases: list[Case] = []
    with_task = {**DATA_FREE, "evaluation": {"tasks": ["arc_easy"]}}
    _measure(cases, web, "the first submission naming an lm-eval task", submit(with_task))
    name = "an upload of 10,000,000 rows (130 MB), refused at the default cap"
    _measure(cases, web, name, lambda: _upload(api, 10_000_000, "ten-million"))
    name = f"an upload of {STORED_ROWS:,} rows, the most the default cap stores"
    stored = _measure(cases, web, name, lambda: _upload(api, STORED_ROWS, "largest-stored"))
    if stored.status_code == 201:
        named = {"preset": "int8-w8a8-gptq", "calibration": {"kind": "upload", "dataset_id": stored.json()["id"]}}
        for number in (1, 2, 3):
            _measure(cases, web, f"submission {number} naming the {STORED_ROWS:,}-row upload", submit(named))
    deep, headers = "[" * 100_000 + "]" * 100_000, {"Content-Type": "application/json"}
    for method, path in (("post", "/api/v1/jobs/"), ("put", "/api/v1/hub-token/")):
        send = lambda method=method, path=path: api.session.request(  # noqa: E731
            method, api.url(path), data=deep, headers=headers, timeout=120
        )
        _measure(cases, web, f"JSON nested 100,000 deep, {method.upper()} {path}", send)
    backtracking = _recipe(
        "QuantizationModifier: {scheme: FP8_DYNAMIC, targets: ['re:.*mlp\\.down_proj$'], ignore: "
        + json.dumps(["lm_head", *CATASTROPHIC])
        + "}"
    )
    recipes = {
        "a recipe with an integer of 5,000 digits": "a: " + "1" * 5000 + "\n",
        "a recipe with a sexagesimal float too large for a float": "a: 1" + ":59" * 3000 + ".5\n",
        "a recipe with ignore patterns that backtrack for hours in Python's re": backtracking,
    }
    for name, recipe in recipes.items():
        _measure(cases, web, name, submit({"recipe_yaml": recipe, "calibration": {"kind": "none"}}))
    return cases


def write_report(figures: list[Figure], path: Path) -> None:
    machine = machine_info()
    lines = [
        "# Hostile input: web-process CPU per request (bench part hostile, issue 30)",
        "",
        __doc__.split("\n\n")[1].strip(),
        "",
        f"Machine: {machine['nproc']} CPUs, {machine['RAM']} RAM, load {machine['load average at start']} at the "
        f"start, "
        f"{machine['date']}. Command: `BENCH_DB_NAME=bench_hostile .venv/bin/python -m bench.part_hostile`.",
        "",
        "| figure | target | measured | verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| {f.name} | {f.target} | {f.measured} | {f.verdict} |" for f in figures]
    lines += ["", "## Each request", ""]
    lines += [f"- {detail}" for figure in figures for detail in figure.details]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    """The bench's stack (its database: BENCH_DB_NAME, bench_compressor unless set), this part only, the report
    written."""
    from bench import stack as stack_mod

    stack_mod.ensure_services()
    stack_mod.setup_django()
    stack_mod.recreate_database()
    stack_mod.migrate()
    stack_mod.reset_data_dir()
    with stack_mod.Stack() as stack:
        stack.user, stack.token = stack_mod.bench_user()
        figures = run(stack)
    for figure in figures:
        print(f"{figure.name}: {figure.measured} [{figure.verdict}]")
        print("\n".join(f"  {detail}" for detail in figure.details))
    write_report(figures, RESULTS_DIR / "hostile.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
