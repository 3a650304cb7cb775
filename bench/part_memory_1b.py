"""Part 7, memory_1b: the peak RSS of a job on a 1 B model, over the idle worker, against its bf16 size.

The model: random weights in Llama-3.2-1B's shape (bench/random_model.py), built once into
var/bench/models (git-ignored) and reused. The job: fp8-dynamic (data-free) through the API on a warm
worker, which plans its memory (engine.plan) and runs it; the worker's prefork child is sampled with psutil
every 0.1 s. The figure is (peak child RSS during the job - the child's RSS just before it) / the model's
bf16 size on disk: what a job costs beyond the warm worker, target <= 1.5 x.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import psutil

from bench.common import BENCH_DIR, PYTHON, REPO, Figure, mb, verdict
from bench.part_job_time import JOB_TIMEOUT_S, RssSampler
from bench.stack import Stack

MODEL_DIR = BENCH_DIR / "models" / "llama-3.2-1b-random"
TARGET = 1.5


def ensure_model() -> Path:
    """The random 1 B model, built on first use (about a minute); a subprocess, so the harness never imports torch."""
    if not (MODEL_DIR / "config.json").is_file():
        build = [str(PYTHON), str(REPO / "bench" / "random_model.py"), str(MODEL_DIR)]
        proc = subprocess.run(build, cwd=REPO, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"Building the random 1 B model failed:\n{proc.stderr[-3000:]}")
    return MODEL_DIR


def run(stack: Stack) -> list[Figure]:
    model = ensure_model()
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    stack.start_worker()
    stack.wait_worker_warm()
    idle = max((psutil.Process(p).memory_info().rss for p in stack.worker_pool_pids()), default=0)
    with RssSampler(lambda: [stack.worker.pid, *stack.worker_pool_pids()]) as sampler:
        body = {"model": str(model), "preset": "fp8-dynamic", "calibration": {"kind": "none"}, "force": True}
        job = stack.api.wait_terminal(stack.api.submit(body)["id"], timeout=JOB_TIMEOUT_S)
    if job["status"] != "succeeded":
        raise RuntimeError(f"Job {job['id']} on the 1 B model {job['status']}: {job.get('error')}")
    results = job.get("results") or {}
    plan = (results.get("settings") or {}).get("memory_plan") or {}
    over = sampler.peak_single - idle
    times = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in (results.get("timings") or {}).items())
    return [
        Figure(
            "memory_1b",
            "Job peak RSS over the idle worker / bf16 size, 1 B random model (Llama-3.2-1B shape)",
            f"<= {TARGET} x",
            f"{mb(over)} vs {mb(model_bytes)} = {over / model_bytes:.2f} x",
            over / model_bytes / TARGET,
            verdict(over / model_bytes <= TARGET),
            [
                f"worker child idle (warm, imports done) {mb(idle)}; peak during the job {mb(sampler.peak_single)}; "
                f"worker tree peak {mb(sampler.peak_sum)} (shared pages counted twice)",
                f"memory plan: {plan.get('mode', '?')}: {plan.get('summary', 'not recorded')}",
                f"fp8-dynamic, data-free; {times}",
            ],
        )
    ]
