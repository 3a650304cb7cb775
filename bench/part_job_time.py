"""Parts 1 and 2: job time through the service against a bare llm-compressor script, and worker memory.

Service run (A): POST /api/v1/jobs/ {"preset": P, "force": true} -> a warm Celery worker (torch, transformers
and llm-compressor already imported, one warm-up job done) -> engine -> checkpoint; the clock stops when the
job's manifest downloads. Bare run (B): bench/bare_oneshot.py in a fresh process with the same recipe (the
one preflight resolves) and the identical pre-tokenized calibration set; the clock is the process's wall time.
Runs alternate A B A B per preset; figures are ratios of medians.

Memory: the worker's process tree is sampled with psutil every 0.1 s during each job; the job runs in the
prefork child, whose peak RSS is compared with the bf16 model's size on disk.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil

from bench.common import BENCH_DIR, PYTHON, REPO, Figure, median, verdict
from bench.stack import Stack

PRESETS = ("fp8-dynamic", "int8-w8a8-gptq")
JOB_TIMEOUT_S = 900
OVERHEAD_TARGET_S = 3.0
MEMORY_TARGET = 2.5


class RssSampler:
    """Samples the RSS of a set of processes in a thread; keeps the peak per process and of their sum."""

    def __init__(self, pids, interval: float = 0.1) -> None:
        self._pids = pids  # a callable returning the pids to sample now
        self.interval = interval
        self.peak_single = 0
        self.peak_sum = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._procs: dict[int, psutil.Process] = {}

    def _rss(self) -> list[int]:
        values = []
        for pid in self._pids():
            try:
                proc = self._procs.get(pid) or self._procs.setdefault(pid, psutil.Process(pid))
                values.append(proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return values

    def _run(self) -> None:
        while not self._stop.is_set():
            values = self._rss()
            if values:
                self.samples += 1
                self.peak_single = max(self.peak_single, max(values))
                self.peak_sum = max(self.peak_sum, sum(values))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def prepare_inputs(out: Path) -> dict:
    proc = subprocess.run(
        [str(PYTHON), str(REPO / "bench" / "prepare_inputs.py"), str(out), *PRESETS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("PREPARED "):
            return json.loads(line[len("PREPARED ") :])
    raise RuntimeError(f"prepare_inputs failed:\n{proc.stderr[-3000:]}")


def service_run(stack: Stack, preset: str) -> dict:
    pool_pids = stack.worker_pool_pids()
    idle_child = max((psutil.Process(p).memory_info().rss for p in pool_pids), default=0)
    with RssSampler(lambda: [stack.worker.pid, *stack.worker_pool_pids()]) as sampler:
        wall0, t0 = time.time(), time.perf_counter()
        job = stack.api.submit({"preset": preset, "force": True})
        submit_s = time.perf_counter() - t0
        job = stack.api.wait_terminal(job["id"], timeout=JOB_TIMEOUT_S)
        if job["status"] != "succeeded":
            raise RuntimeError(f"Job {job['id']} ({preset}) {job['status']}: {job.get('error')}")
        manifest = stack.api.get(f"/api/v1/jobs/{job['id']}/manifest/")
        if manifest.status_code != 200:
            raise RuntimeError(f"Job {job['id']}: manifest answered {manifest.status_code}")
        total = time.perf_counter() - t0
    timings = (job.get("results") or {}).get("timings") or {}
    created, started, finished = _ts(job["created_at"]), _ts(job["started_at"]), _ts(job["finished_at"])
    in_worker = finished - started
    engine_sum = sum(v for k, v in timings.items() if k.endswith("_s"))
    evaluation = (job.get("results") or {}).get("evaluation")
    return {
        "job_id": job["id"],
        "total_s": total,
        "submit_s": submit_s,
        "queue_wait_s": started - created,
        "in_worker_s": in_worker,
        "worker_other_s": in_worker - engine_sum,
        "after_finish_s": (wall0 + total) - finished,
        "before_create_s": created - wall0,
        "load_s": timings.get("load_s", 0.0),
        "compress_s": timings.get("compress_s", 0.0),
        "save_s": timings.get("save_s", 0.0),
        "hash_s": timings.get("hash_s", 0.0),
        "eval_s": timings.get("evaluate_s", timings.get("eval_s", 0.0)),
        "evaluated": evaluation is not None,
        "overhead_s": total - timings.get("compress_s", 0.0) - timings.get("save_s", 0.0),
        "peak_child_rss": sampler.peak_single,
        "peak_tree_rss": sampler.peak_sum,
        "idle_child_rss": idle_child,
        "recipe": job.get("resolved_recipe", ""),
    }


def bare_run(inputs: dict, preset: str, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(PYTHON), str(REPO / "bench" / "bare_oneshot.py"), "--model", inputs["model_path"]]
    argv += ["--recipe", inputs["presets"][preset]["recipe"], "--out", str(out)]
    if inputs["presets"][preset]["needs_calibration"]:
        argv += ["--dataset", inputs["calibration"], "--max-seq-len", str(inputs["max_seq_len"])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with RssSampler(lambda: [proc.pid]) as sampler:
        try:
            stdout, stderr = proc.communicate(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BARE_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"bare_oneshot failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(line[len("BARE_RESULT ") :])
    result["wall_s"] = wall
    result["startup_s"] = wall - result["total_in_process_s"] + result["import_s"]
    result["peak_rss"] = max(result["peak_rss_bytes"], sampler.peak_single)
    return result


def import_rss() -> int:
    """Peak RSS of a fresh process that only imports torch, transformers and llm-compressor."""
    code = "import resource, torch, transformers, llmcompressor\n"
    code += "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    try:
        out = subprocess.run([str(PYTHON), "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
        return int(out.stdout.strip().splitlines()[-1]) * 1024
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return 0


def run(stack: Stack, *, reps: int = 3, budget_s: float = 420.0) -> list[Figure]:
    work = BENCH_DIR / "job_time"
    inputs = prepare_inputs(work / "inputs")
    model_bytes = inputs["model_bytes"]
    print(f"  inputs ready: {inputs.get('calibration_rows')} calibration rows, model {model_bytes / 1e6:.0f} MB")

    stack.start_worker()
    stack.wait_worker_warm()
    warm = service_run(stack, PRESETS[0])  # the warm-up job: first-use imports inside the engine
    print(f"  warm-up job {warm['job_id']}: {warm['total_s']:.1f} s", flush=True)

    svc: dict[str, list[dict]] = {p: [] for p in PRESETS}
    bare: dict[str, list[dict]] = {p: [] for p in PRESETS}
    measured0 = time.monotonic()
    for rep in range(reps):
        rep0 = time.monotonic()
        for preset in PRESETS:
            s = service_run(stack, preset)
            svc[preset].append(s)
            b = bare_run(inputs, preset, work / f"bare-{preset}")
            bare[preset].append(b)
            print(
                f"  [{rep + 1}/{reps}] {preset}: service {s['total_s']:.1f} s (overhead {s['overhead_s']:.1f} s), "
                f"bare {b['wall_s']:.1f} s; RSS worker child {s['peak_child_rss'] / 1e6:.0f} MB, "
                f"bare {b['peak_rss'] / 1e6:.0f} MB",
                flush=True,
            )
            if s["recipe"].strip() != Path(inputs["presets"][preset]["recipe"]).read_text().strip():
                raise RuntimeError(f"{preset}: the service ran another recipe than the bare script")
        spent, last = time.monotonic() - measured0, time.monotonic() - rep0
        if rep + 1 < reps and spent + last > budget_s:
            print(f"  stopping after {rep + 1} of {reps} pairs: the next would pass the {budget_s:.0f} s budget")
            break
    imports = import_rss()

    figures: list[Figure] = []
    for preset in PRESETS:
        S, B = svc[preset], bare[preset]

        def med(rows: list[dict], key: str) -> float:
            return median(r[key] for r in rows)

        ratio = med(S, "total_s") / med(B, "wall_s")
        pairs = ", ".join(f"{s['total_s']:.1f}/{b['wall_s']:.1f}" for s, b in zip(S, B, strict=True))
        details = [
            f"pairs service/bare (s): {pairs} ({len(S)} pairs)",
            f"service median {med(S, 'total_s'):.2f} s = submit (POST, preflight) {med(S, 'submit_s'):.2f} "
            f"+ queue wait {med(S, 'queue_wait_s'):.2f} + model load {med(S, 'load_s'):.2f} "
            f"+ calibration data & oneshot {med(S, 'compress_s'):.2f} + save {med(S, 'save_s'):.2f} "
            f"+ hashing {med(S, 'hash_s'):.2f} + evaluation {med(S, 'eval_s'):.2f}"
            f"{'' if any(r['evaluated'] for r in S) else ' (none requested)'} "
            f"+ other in the worker (preflight again, results, DB) {med(S, 'worker_other_s'):.2f} "
            f"+ finish -> seen by the client (polling 0.25 s, manifest GET) {med(S, 'after_finish_s'):.2f}",
            f"bare median {med(B, 'wall_s'):.2f} s = interpreter start + imports {med(B, 'startup_s'):.2f} "
            f"+ model load {med(B, 'load_s'):.2f} + calibration load & oneshot {med(B, 'oneshot_s'):.2f} "
            f"+ save {med(B, 'save_s'):.2f}",
        ]
        figures.append(
            Figure(
                "job_time",
                f"Job time {preset}: service / bare script",
                "<= 1.0",
                f"{med(S, 'total_s'):.1f} s vs {med(B, 'wall_s'):.1f} s",
                ratio,
                verdict(ratio <= 1.0),
                details,
            )
        )
        overhead = med(S, "overhead_s")
        figures.append(
            Figure(
                "job_time",
                f"Service overhead {preset} (outside oneshot + save)",
                f"< {OVERHEAD_TARGET_S:.0f} s",
                f"{overhead:.2f} s",
                overhead / OVERHEAD_TARGET_S,
                verdict(overhead < OVERHEAD_TARGET_S),
                [
                    "overhead = client-observed job time - engine compress_s (calibration data + oneshot) - save_s; "
                    f"per run: {', '.join(format(r['overhead_s'], '.2f') for r in S)} s",
                    f"of which model load {med(S, 'load_s'):.2f}, hashing {med(S, 'hash_s'):.2f}, "
                    f"submit {med(S, 'submit_s'):.2f}, queue wait {med(S, 'queue_wait_s'):.2f}, "
                    f"worker other {med(S, 'worker_other_s'):.2f}, finish -> client {med(S, 'after_finish_s'):.2f}",
                ],
            )
        )
        peak = med(S, "peak_child_rss")
        mem_ratio = peak / model_bytes
        figures.append(
            Figure(
                "memory",
                f"Worker peak RSS {preset} / bf16 model",
                f"<= {MEMORY_TARGET} x",
                f"{peak / 1e6:.0f} MB vs {model_bytes / 1e6:.0f} MB",
                mem_ratio,
                verdict(mem_ratio <= MEMORY_TARGET),
                [
                    f"worker child idle before the job (torch, transformers, llm-compressor imported, after earlier "
                    f"jobs) {med(S, 'idle_child_rss') / 1e6:.0f} MB; peak during the job {peak / 1e6:.0f} MB "
                    f"(+{(peak - med(S, 'idle_child_rss')) / 1e6:.0f} MB = "
                    f"{(peak - med(S, 'idle_child_rss')) / model_bytes:.2f} x the model)",
                    f"worker tree (main + child) peak {med(S, 'peak_tree_rss') / 1e6:.0f} MB "
                    "(shared pages counted twice)",
                    f"bare script peak RSS {med(B, 'peak_rss') / 1e6:.0f} MB "
                    f"= {med(B, 'peak_rss') / model_bytes:.2f} x; "
                    f"a process that only imports torch + transformers + llm-compressor: {imports / 1e6:.0f} MB "
                    f"= {imports / model_bytes:.2f} x the model before any weight is loaded",
                ],
            )
        )
    return figures
