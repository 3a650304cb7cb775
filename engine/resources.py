"""What this worker has to run a job with: its GPUs and their free memory, host memory, disk.

Each figure is measured (torch.cuda.mem_get_info, psutil, shutil.disk_usage) and may be capped by the
operator (WorkerCaps, from the COMPRESSOR_WORKER_* settings the Celery task passes in): a worker shared
with other work, or a test that makes a small machine out of a big one. A cap only ever lowers a figure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MB = 10**6  # the caps are given in decimal megabytes, like every size the service shows (engine.units)


@dataclass(frozen=True)
class WorkerCaps:
    """Upper bounds on what the worker may use; None leaves a figure as measured."""

    host_ram_mb: int | None = None
    gpu_memory_mb: int | None = None  # per GPU
    gpus: int | None = None  # 0 makes a GPU worker plan like a CPU-only one
    disk_mb: int | None = None
    # Not a cap: the operator's choice of data-parallel calibration ranks (engine.data_parallel); None lets
    # the memory plan decide, 1 turns it off, N > 1 asks for N ranks (gloo processes on a CPU worker).
    data_parallel: int | None = None


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    free_bytes: int


@dataclass(frozen=True)
class WorkerResources:
    """The worker's resources as the memory plan sees them (after the caps)."""

    host_ram_bytes: int  # host memory available now
    disk_free_bytes: int  # where the checkpoint and any offload folder go
    gpus: tuple[Gpu, ...] = ()
    capped: tuple[str, ...] = field(default=())  # which figures a cap lowered: "host_ram", "gpu_memory", ...


def detect_resources(
    folder: Path, *, device: str = "auto", caps: WorkerCaps | None = None, gpus_in_child: bool = False
) -> WorkerResources:
    """Measure this worker's resources; `folder` is where the job writes (its disk is the one measured).

    device "cpu" leaves the GPUs out: the job was sent to a CPU worker and must not use one.
    gpus_in_child: the GPUs are measured by a child Python, so this process never initialises CUDA (a Celery
    worker's main process announcing itself: its pool children are forked from it, and CUDA does not survive
    a fork).
    """
    caps = caps or WorkerCaps()
    capped: list[str] = []
    host = _capped(psutil.virtual_memory().available, caps.host_ram_mb, "host_ram", capped)
    disk = _capped(shutil.disk_usage(_existing(folder)).free, caps.disk_mb, "disk", capped)
    gpus = [] if device == "cpu" else _gpus_of_child() if gpus_in_child else _gpus()
    if caps.gpus is not None and caps.gpus < len(gpus):
        gpus = gpus[: caps.gpus]
        capped.append("gpus")
    gpus = [Gpu(g.index, g.name, _capped(g.free_bytes, caps.gpu_memory_mb, "gpu_memory", capped)) for g in gpus]
    return WorkerResources(
        host_ram_bytes=host, disk_free_bytes=disk, gpus=tuple(gpus), capped=tuple(dict.fromkeys(capped))
    )


def _capped(measured: int, cap_mb: int | None, name: str, capped: list[str]) -> int:
    if cap_mb is None or cap_mb * MB >= measured:
        return measured
    capped.append(name)
    return cap_mb * MB


def _existing(folder: Path) -> Path:
    """The folder, or its nearest existing parent (the job's output folder does not exist yet)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return folder


def _gpus() -> list[Gpu]:
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        free, _total = torch.cuda.mem_get_info(index)
        found.append(Gpu(index=index, name=torch.cuda.get_device_name(index), free_bytes=int(free)))
    return found


_GPU_PROBE = (
    "import dataclasses, json; from engine.resources import _gpus; "
    "print(json.dumps([dataclasses.asdict(g) for g in _gpus()]))"
)
_GPU_PROBE_TIMEOUT_S = 300  # importing torch on a loaded machine


def _gpus_of_child() -> list[Gpu]:
    """_gpus() in a child Python (the same code, torch imported there only); RuntimeError when it fails."""
    package_parent = Path(__file__).resolve().parent.parent
    python_path = os.pathsep.join(filter(None, [str(package_parent), os.environ.get("PYTHONPATH")]))
    try:
        done = subprocess.run(
            [sys.executable, "-c", _GPU_PROBE],
            cwd=package_parent,
            env={**os.environ, "PYTHONPATH": python_path},
            capture_output=True,
            text=True,
            timeout=_GPU_PROBE_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"Measuring the GPUs in a child process failed: {exc}") from exc
    if done.returncode != 0:
        raise RuntimeError(f"Measuring the GPUs in a child process failed: {done.stderr.strip()[-500:]}")
    return [Gpu(**found) for found in json.loads(done.stdout.strip().splitlines()[-1])]
