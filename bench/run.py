"""Run the benchmarks and print one table: figure | target | measured | ratio | verdict.

    .venv/bin/python bench/run.py                      # every part (what `make bench` runs)
    .venv/bin/python bench/run.py --part downloads     # one part (repeat --part for several)

Parts: job_time (with memory), throughput, dashboard, downloads, s3_downloads, gpu, hub_submission, memory_1b,
vllm_cpu, save, hostile, families (each model family x int8-w8a8-gptq and w4a16-gptq, written to
bench/results/families.md). The bench starts its own web server and Celery worker against its own PostgreSQL
database (bench_compressor) and data folder (var/bench/data), and a local hub for hub_submission, and stops them at the
end. It reports; it never fails the build (exit status 0 unless it cannot start). The table is also written to
bench/results/latest.md with the machine and the date.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, Figure, error_figure, machine_info, plain_table, table  # noqa: E402

PARTS = (
    "job_time", "throughput", "dashboard", "downloads", "s3_downloads", "gpu", "hub_submission", "memory_1b",
    "vllm_cpu", "save", "hostile", "families",
)  # fmt: skip


def run_part(name: str, stack, args, hub) -> list[Figure]:
    if name == "job_time":
        from bench import part_job_time

        return part_job_time.run(stack, reps=args.reps, budget_s=args.job_budget)
    if name == "throughput":
        from bench import part_throughput

        return part_throughput.run(stack, total=args.submissions, concurrency=args.concurrency)
    if name == "dashboard":
        from bench import part_dashboard

        return part_dashboard.run(stack, jobs=args.history, requests_per_page=args.page_requests)
    if name == "downloads":
        from bench import part_downloads

        return part_downloads.run(stack, pairs=args.pairs)
    if name == "s3_downloads":
        from bench import part_s3_downloads

        return part_s3_downloads.run(stack, pairs=args.pairs)
    if name == "gpu":
        from bench import part_gpu

        return part_gpu.run(stack)
    if name == "hub_submission":
        from bench import part_hub_submission

        return part_hub_submission.run(stack, hub, total=args.hub_submissions, concurrency=args.concurrency)
    if name == "memory_1b":
        from bench import part_memory_1b

        return part_memory_1b.run(stack)
    if name == "vllm_cpu":
        from bench import part_vllm_cpu

        return part_vllm_cpu.run()
    if name == "save":
        from bench import part_save

        return part_save.run()
    if name == "hostile":
        from bench import part_hostile

        return part_hostile.run(stack)
    if name == "families":
        from bench import part_families

        return part_families.run()
    raise ValueError(name)


def write_results(figures: list[Figure], machine: dict[str, str], parts: list[str], elapsed: float) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    lines = ["# Benchmark results (last run)", ""]
    lines += [f"- **{key}**: {value}" for key, value in machine.items()]
    lines += [f"- **parts**: {', '.join(parts)}", f"- **bench wall time**: {elapsed:.0f} s", ""]
    lines += table(figures)
    lines += ["", "## Where the time and memory go", ""]
    for figure in figures:
        if figure.details:
            lines.append(f"### {figure.name}")
            lines += [f"- {d}" for d in figure.details]
            lines.append("")
    path = RESULTS_DIR / "latest.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the compression service against its baselines.")
    parser.add_argument("--part", action="append", choices=PARTS, help="run only this part (repeatable)")
    parser.add_argument("--reps", type=int, default=3, help="job_time: A B pairs per preset (default 3)")
    parser.add_argument(
        "--job-budget", type=float, default=420.0, help="job_time: stop adding pairs past this many seconds (420)"
    )
    parser.add_argument("--submissions", type=int, default=200, help="throughput: job submissions (200)")
    parser.add_argument(
        "--concurrency", type=int, default=20, help="throughput, hub_submission: concurrent clients (20)"
    )
    # A p95 of 200 is its 10 slowest: one pause of a web process moves it by tens of ms (run to run: 150-220 ms).
    parser.add_argument(
        "--hub-submissions", type=int, default=1000, help="hub_submission: hub-model submissions (1000)"
    )
    parser.add_argument("--history", type=int, default=10_000, help="dashboard: jobs in the database (10000)")
    parser.add_argument("--page-requests", type=int, default=100, help="dashboard: requests per page (100)")
    parser.add_argument("--pairs", type=int, default=3, help="downloads, s3_downloads: A B pairs per case (3)")
    args = parser.parse_args(argv)
    parts = [p for p in PARTS if p in (args.part or PARTS)]

    started = time.monotonic()
    machine = machine_info()
    print(f"Benchmarks: {', '.join(parts)} on {machine['nproc']} CPUs, {machine['RAM']} RAM", flush=True)

    from bench import stack as stack_mod

    stack_mod.ensure_services()
    stack_mod.setup_django()
    stack_mod.recreate_database()
    stack_mod.migrate()
    stack_mod.reset_data_dir()

    figures: list[Figure] = []
    hub = None
    if "hub_submission" in parts:  # before the web server, which reads HF_ENDPOINT when it starts
        from bench.part_hub_submission import start_hub

        hub = start_hub()
    with stack_mod.Stack() as stack:
        try:
            stack.start_web()
        except Exception as exc:  # noqa: BLE001 - report, never fail
            traceback.print_exc()
            figures.append(error_figure("web server", exc))
            parts_to_run: list[str] = []
        else:
            parts_to_run = parts
        for name in parts_to_run:
            part_started = time.monotonic()
            print(f"\n== {name} ==", flush=True)
            try:
                new = run_part(name, stack, args, hub)
            except Exception as exc:  # noqa: BLE001 - one broken part must not hide the others
                traceback.print_exc()
                new = [error_figure(name, exc)]
            finally:
                stack.stop_worker()
            for figure in new:
                print(f"  {figure.name}: {figure.measured} [{figure.verdict}]", flush=True)
            print(f"  ({time.monotonic() - part_started:.0f} s)", flush=True)
            figures.extend(new)

    if hub is not None:
        hub.stop()
    elapsed = time.monotonic() - started
    print()
    print(plain_table(figures))
    path = write_results(figures, machine, parts, elapsed)
    print(f"\nWritten to {path.relative_to(RESULTS_DIR.parent.parent)} ({elapsed:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
