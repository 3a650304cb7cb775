"""vLLM's work in a child process: another Python (COMPRESSOR_VLLM_PYTHON), a process group of its own.

vLLM and llm-compressor pin different torch builds, and vLLM holds the GPUs until its process exits, so
the worker never imports it: it runs engine/vllm_child.py in the configured interpreter and waits, calling
`on_wait` between polls (the job's progress callback, which raises CancelledError on cancel). Any exception
while waiting (a cancel, Celery's soft time limit) kills the child's whole group before it propagates, so
no vLLM engine process outlives its job or keeps GPU memory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from engine.errors import EngineError
from engine.plan import tensor_parallel_problem
from engine.vllm_child import NOT_INSTALLED_EXIT

VLLM_PYTHON_ENV = "COMPRESSOR_VLLM_PYTHON"
CPU_TENSOR_PARALLEL_ENV = "COMPRESSOR_VLLM_CPU_TENSOR_PARALLEL"
CPU_BINDING_ENV = "VLLM_CPU_OMP_THREADS_BIND"  # vLLM's own: each rank's cores, "0-3|4-7"
CHILD_SCRIPT = Path(__file__).with_name("vllm_child.py")
_POLL_S = 0.5
_STOP_GRACE_S = 10


def vllm_python() -> str:
    """The interpreter of the vLLM environment (COMPRESSOR_VLLM_PYTHON), else this one."""
    return os.environ.get(VLLM_PYTHON_ENV) or sys.executable


def vllm_installed(python: str | None = None) -> bool:
    """Whether the vLLM environment can import vllm (asked of that interpreter, never imported here)."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        return subprocess.run([python or vllm_python(), "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def float_quantized_parts(checkpoint: Path) -> str:
    """ "weights", "activations" or "weights and activations" where a compressed-tensors checkpoint quantizes
    them to a floating-point type (FP8, NVFP4); "" for integer schemes and unquantized models."""
    config = json.loads((checkpoint / "config.json").read_text())
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    parts = [
        part
        for part, key in (("weights", "weights"), ("activations", "input_activations"))
        if any((group.get(key) or {}).get("type") == "float" for group in groups.values())
    ]
    return " and ".join(parts)


def int8_moe_experts(checkpoint: Path) -> bool:
    """Whether a compressed-tensors checkpoint holds MoE experts quantized to int8 with int8 activations (W8A8),
    for which vLLM's CPU build has no MoE backend (vLLM 0.32: "No Int8 MoE backend supports the deployment
    configuration"); a GPU worker's vLLM has one."""
    from safetensors import safe_open

    config = json.loads((checkpoint / "config.json").read_text())
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    if not any((group.get("input_activations") or {}).get("type") == "int" for group in groups.values()):
        return False
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(file, framework="numpy") as handle:
            if any(_EXPERT_SCALE.search(name) for name in handle.keys()):  # noqa: SIM118 - not a mapping
                return True
    return False


_EXPERT_SCALE = re.compile(r"\.experts\.\d+\.[^.]+\.weight_scale$")
MISSING_MODULE = re.compile(r"No module named '([\w.]+)'")


def cpu_engine_args(ranks: int = 1) -> dict[str, Any]:
    """vLLM's arguments for a check on the CPU backend, where they mean other things than on a GPU; ranks: its
    tensor-parallel ranks (cpu_tensor_parallel)."""
    memory = psutil.virtual_memory()
    return {
        # Without it the CPU backend compiles the model first: 40 s more for a 135 M model, for a check of
        # loading and generating, not of top speed.
        "enforce_eager": True,
        # The fraction of host memory vLLM may take, per rank: it refuses to start when that is more than is
        # free, and each rank takes it for its KV cache (two ranks of half the memory each were OOM-killed).
        "gpu_memory_utilization": round(0.5 * memory.available / memory.total / ranks, 3),
        "max_model_len": 1024,  # the check's prompts and answers are short: a small KV cache
    }


def cpu_tensor_parallel(checkpoint: Path) -> tuple[int, dict[str, str]]:
    """vLLM's CPU backend on a CPU worker: its tensor-parallel ranks, and the environment that binds each rank
    to its share of the worker's cores.

    The operator asks for N ranks (COMPRESSOR_VLLM_CPU_TENSOR_PARALLEL, default 1; vLLM advises one per NUMA
    node); a model whose attention heads N does not divide gets the largest number below N that does, and
    never more ranks than cores. The cores are split into N contiguous groups unless the operator bound them
    (VLLM_CPU_OMP_THREADS_BIND, for a NUMA machine whose nodes' cores are not contiguous).
    """
    raw = os.environ.get(CPU_TENSOR_PARALLEL_ENV) or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise EngineError(
            f"{CPU_TENSOR_PARALLEL_ENV} is {raw!r}: it must be a whole number of vLLM ranks, 1 or more.",
            field="evaluation",
        )
    asked = int(raw)
    cores = sorted(os.sched_getaffinity(0))
    config = json.loads((checkpoint / "config.json").read_text())
    heads = int(config.get("num_attention_heads") or 0)
    ranks = max(n for n in range(1, min(asked, len(cores)) + 1) if tensor_parallel_problem(heads, n) is None)
    if ranks == 1 or os.environ.get(CPU_BINDING_ENV):
        return ranks, {}
    share = len(cores) // ranks
    groups = [cores[rank * share : (rank + 1) * share] for rank in range(ranks)]
    return ranks, {CPU_BINDING_ENV: "|".join(",".join(map(str, group)) for group in groups)}


def run_child(
    request: dict,
    *,
    python: str | None = None,
    gpus: list[int] | None = None,
    env: dict[str, str] | None = None,
    on_wait: Callable[[], None] | None = None,
) -> dict:
    """Run one request of engine/vllm_child.py in `python` and return its result.

    gpus: the CUDA devices the child may use, as this process numbers them; None leaves the worker's own
    setting. env: more environment variables for the child.
    Raises EngineError (field "evaluation") when the child cannot run or fails, with the end of its output.
    """
    python = python or vllm_python()
    env = {**os.environ, **(env or {})}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(gpus, env.get("CUDA_VISIBLE_DEVICES"))
    with tempfile.TemporaryDirectory(prefix="vllm-child-") as folder:
        request_path, result_path, log_path = (Path(folder) / name for name in ("request.json", "result.json", "log"))
        request_path.write_text(json.dumps(request))
        with log_path.open("wb") as log:
            try:
                process = subprocess.Popen(
                    [python, str(CHILD_SCRIPT), str(request_path), str(result_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # its own process group: vLLM's engine processes go with it
                )
            except OSError as exc:
                raise EngineError(
                    f"The vLLM environment's Python '{python}' cannot be started: {exc}.", field="evaluation"
                ) from None
            wait_in_group(process, on_wait)
        # Whatever of its group outlived it (vLLM's engine, after an abort in the interpreter's teardown).
        _signal_group(process, signal.SIGKILL)
        # The result is written last, once the work is done: an abort after it (vLLM's CPU build under lm-eval
        # ends with "terminate called without an active exception", exit -6) loses nothing.
        if result_path.exists():
            return json.loads(result_path.read_text())
        output = log_path.read_text(errors="replace")
        tail = output[-2000:]
        if process.returncode == NOT_INSTALLED_EXIT:
            raise EngineError(
                f"vLLM is not installed in {python}; set {VLLM_PYTHON_ENV} to the Python of a vLLM environment "
                "(make vllm-env), or use the hf backend.",
                field="evaluation",
            )
        # vLLM logs the import that failed far above its own last line ("Model architectures [...] failed to be
        # inspected"): the missing module is the reason.
        missing = MISSING_MODULE.search(output) if "failed to be inspected" in tail else None
        cause = f" ({missing.group(0)})" if missing and missing.group(0) not in tail else ""
        raise EngineError(
            f"The vLLM process failed (exit {process.returncode}){cause}: {tail.strip()}", field="evaluation"
        )


def visible_devices(gpus: list[int], parent_visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for a child using `gpus` as this process numbers them: a worker that owns GPUs
    "2,3" sees them as 0 and 1, so its GPU 1 is the machine's GPU 3."""
    owned = [device.strip() for device in parent_visible.split(",")] if parent_visible else None
    return ",".join(owned[gpu] if owned and gpu < len(owned) else str(gpu) for gpu in gpus)


def wait_in_group(process: subprocess.Popen, on_wait: Callable[[], None] | None) -> None:
    """Wait for a child started in its own process group, calling on_wait between polls; any exception
    meanwhile (a cancel, a time limit) stops the whole group before it propagates."""
    try:
        while True:
            try:
                process.wait(timeout=_POLL_S)
                return
            except subprocess.TimeoutExpired:
                if on_wait:
                    on_wait()
    except BaseException:
        stop_group(process)
        raise


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever of the group is left after a grace period
    (vLLM's engine processes may outlive the leader)."""
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(process, signal.SIGKILL)
    process.wait()


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
