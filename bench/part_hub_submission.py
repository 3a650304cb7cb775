"""Part 7, hub submission: the API's submission latency for a hub model at concurrency C (target p95 < 200 ms).

The model is a Llama-3.2-1B-shaped repository (its real config, a real safetensors header over 2.5 GB of
generated zeros) on a local server that speaks the hub's HTTP API (tests/hub_server.py) in a process of its
own (bench.hub_process), started before the web server so that the web server's HF_ENDPOINT names it. Each
submission reads the model's metadata from it (file list and commit, config.json, the safetensors header),
checks W4A16's group size against the header's shapes and records the commit; nothing is downloaded. No
worker runs: the jobs are cancelled afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.common import DATA_DIR, REPO, Figure, median, percentile, verdict
from bench.hub_process import REPO_ID
from bench.part_throughput import submit_burst
from bench.stack import Stack

TARGET_P95_S = 0.200


class LocalHub:
    """bench.hub_process: the local hub in a process of its own, this process's environment (inherited by the
    web server) pointed at it."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.hub_process", str(DATA_DIR / "hf-hub-cache")],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        os.environ.update(json.loads(self.process.stdout.readline()))

    def requests_answered(self) -> int:
        self.process.stdin.write("count\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def stop(self) -> None:
        self.process.communicate(timeout=60)


def start_hub() -> LocalHub:
    return LocalHub()


def run(stack: Stack, hub: LocalHub, *, total: int = 200, concurrency: int = 20) -> list[Figure]:
    stack.stop_worker()
    payload = {"model": REPO_ID, "preset": "w4a16-gptq", "calibration": {"kind": "builtin"}, "force": True}
    burst = submit_burst(stack, payload, total=total, concurrency=concurrency)
    accepted = burst.statuses.get(201, 0)
    med, p95 = median(burst.latencies), percentile(burst.latencies, 95)
    details = [
        f"{total} POST /api/v1/jobs/ of {REPO_ID} (1.24 B parameters) from {concurrency} threads in "
        f"{burst.wall_s:.1f} s = {total / burst.wall_s:.1f} submissions/s; first submission {burst.first_s:.2f} s",
        f"status codes: {burst.statuses}; latency min {min(burst.latencies) * 1000:.0f} ms, median "
        f"{med * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {max(burst.latencies) * 1000:.0f} ms",
        f"the local hub answered {hub.requests_answered()} requests (metadata only: model info, config.json, "
        "the header's first 100 kB)",
        burst.cpu_text(),
    ]
    if burst.errors:
        details.append(f"first errors: {burst.errors}")
    return [
        Figure(
            "hub_submission",
            f"API: hub-model submission p95 at concurrency {concurrency}",
            f"< {TARGET_P95_S * 1000:.0f} ms",
            f"{p95 * 1000:.0f} ms (median {med * 1000:.0f} ms, {accepted}/{total} accepted)",
            p95 / TARGET_P95_S,
            verdict(p95 < TARGET_P95_S and accepted == total),
            details,
        )
    ]
