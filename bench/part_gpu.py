"""Part 6, GPU: the same job on CUDA and vLLM generation throughput, where a GPU (and vLLM) is present.

On a machine without CUDA every row reads 'n/a (no GPU)'. With a GPU, the CUDA job time is measured
through the service like part 1 (a job with device_class 'gpu' on a worker that sees the GPU).
"""

from __future__ import annotations

import importlib.util
import subprocess

from bench.common import PYTHON, REPO, Figure


def cuda_available() -> bool:
    """Asked in a subprocess, so the harness itself never imports torch."""
    probe = "import torch; print(torch.cuda.is_available())"
    try:
        out = subprocess.run([str(PYTHON), "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip() == "True"


def run(stack) -> list[Figure]:
    if not cuda_available():
        return [
            Figure("gpu", "GPU: int8-w8a8-gptq job on CUDA vs bare", "<= 1.0", "n/a (no GPU)", verdict="n/a"),
            Figure("gpu", "GPU: vLLM generation, compressed vs bf16", "> 1.0", "n/a (no GPU)", verdict="n/a"),
        ]
    vllm = importlib.util.find_spec("vllm") is not None
    return [
        Figure(
            "gpu",
            "GPU: int8-w8a8-gptq job on CUDA vs bare",
            "<= 1.0",
            "not measured: run --part job_time on the GPU worker (it uses CUDA when present)",
            verdict="n/a",
        ),
        Figure(
            "gpu",
            "GPU: vLLM generation, compressed vs bf16",
            "> 1.0",
            "not implemented" if vllm else "n/a (vLLM not installed: the gpu extra)",
            verdict="n/a",
        ),
    ]
