"""Data-parallel calibration: llm-compressor's distributed oneshot over several ranks (engine/dp_rank.py under
torchrun), one per GPU of the job, or processes talking over gloo on a CPU worker.

The memory plan decides when it pays (engine.plan: a GPTQ or SparseGPT recipe with calibration data and a job
with several GPUs, or the operator's COMPRESSOR_WORKER_DATA_PARALLEL). The ranks run in a process group of
their own, which a cancel or a time limit kills whole (engine.isolated); their output becomes the job's log.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.isolated import visible_devices, wait_in_group
from engine.spec import CalibrationSpec


def calibrate_data_parallel(
    *,
    model_path: Path,
    recipe_yaml: str,
    records: list[dict[str, Any]],
    calibration: CalibrationSpec,
    out_dir: Path,
    ranks: int,
    device: str,
    gpus: list[int],
    trust_remote_code: bool = False,
    on_line: Callable[[str], None] | None = None,
    on_wait: Callable[[], None] | None = None,
    resume: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Compress model_path with the recipe over `ranks` ranks and write the checkpoint into out_dir; return
    the per-layer errors ({"module", "error"}) the ranks measured, layer by layer.

    resume: {"dir", "fingerprint"} of the layer store the ranks keep and resume from (engine.dp_rank).

    device "cpu": gloo between CPU processes; else one rank per GPU in `gpus` (as this process numbers them).
    Raises EngineError with the end of the ranks' output when they fail.
    """
    # Fewer progress bars: the job's log drops them anyway. TQDM_DISABLE stops llm-compressor's; the bars of
    # compressed-tensors ignore it, and output_lines takes them off the lines other ranks write after them.
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if device != "cpu":
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(gpus[:ranks], env.get("CUDA_VISIBLE_DEVICES"))
    request = {
        "model": str(model_path),
        "recipe": recipe_yaml,
        "records": records,
        "calibration": asdict(calibration),
        "out": str(out_dir),
        "device": device,
        "trust_remote_code": trust_remote_code,
        "resume": resume,
    }
    with tempfile.TemporaryDirectory(prefix="data-parallel-") as folder:
        request_path = Path(folder) / "request.json"
        request_path.write_text(json.dumps({**request, "errors_dir": folder}))
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        process = subprocess.Popen(
            [*argv, "-m", "engine.dp_rank", str(request_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: every rank goes with it on cancel
        )
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=_read_lines, args=(process, lines), daemon=True)
        reader.start()
        tail: list[str] = []

        def relay_then_wait() -> None:
            # The job's log is written from this thread only (the reader thread just queues lines).
            while not lines.empty():
                for line in output_lines(lines.get()):
                    tail[:] = [*tail[-199:], line]
                    kept = job_log_line(line)
                    if on_line and kept:
                        on_line(kept)
            if on_wait:
                on_wait()

        wait_in_group(process, relay_then_wait)
        reader.join(timeout=10)
        relay_then_wait()
        if process.returncode != 0:
            raise EngineError(
                f"Data-parallel calibration over {ranks} ranks failed (exit {process.returncode}): "
                + "\n".join(tail[-20:]).strip(),
                field="recipe",
            )
        return gathered_layer_errors(Path(folder).glob("rank-*.json"))


def gathered_layer_errors(files) -> list[dict[str, Any]]:
    """The ranks' per-layer errors as one list: each module once (as the first rank had it), layer by layer."""
    by_module: dict[str, dict[str, Any]] = {}
    for path in sorted(files):
        for entry in json.loads(Path(path).read_text()):
            by_module.setdefault(entry["module"], entry)
    return sorted(by_module.values(), key=lambda entry: _module_order(entry["module"]))


def _module_order(name: str) -> tuple:
    # "model.layers.10.mlp" after "model.layers.9.self_attn": the numbers of a module's name compare as numbers.
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


# llm-compressor's log lines name their rank: "[Rank 1] 2026-01-01T00:00:00.0 | function | INFO - message".
_RANK_LINE = re.compile(r"^\[Rank (\d+)\] \S+ \| \S+ \| (\w+) - (.*)$")


# A tqdm bar's redraw: "\r", then "desc:  50%|█████     | 8/16 [00:01<00:01, 7.9it/s]" with no newline, so
# whatever a rank writes next joins it on one line. The bracket of times and rate ends the bar.
_PROGRESS_BAR = re.compile(r"^.*?\[\d+:\d\d(?::\d\d)?[<,][^\]]*?(?:/s|s/)[^\]]*\](?:\x1b\[A|\s)*")


def _read_lines(process: subprocess.Popen, lines: queue.Queue) -> None:
    for raw in process.stdout:
        lines.put(raw.decode(errors="replace"))


def output_lines(raw: str) -> list[str]:
    """The lines in a chunk of the ranks' output, without the progress bars: each redraw ("\r...") is cut off
    the line that another rank's write joined to it."""
    found = []
    for part in re.split(r"[\r\n]", raw):
        line = _PROGRESS_BAR.sub("", part, count=1).strip()
        if line:
            found.append(line)
    return found


def job_log_line(line: str) -> str | None:
    """What the job's log keeps of one of output_lines: rank 0's log messages and the ranks' own lines,
    never a progress bar (a redraw cut short) nor the other ranks' copies of rank 0's messages."""
    if "%|" in line or "it/s]" in line or "s/it]" in line:
        return None
    match = _RANK_LINE.match(line)
    if match is None:
        return line
    rank, level, message = match.groups()
    return None if rank != "0" else (message if level == "INFO" else f"{level}: {message}")
