"""Part 10, save: writing the checkpoint through the engine against the bare `save_pretrained(save_compressed=True)`.

    .venv/bin/python bench/part_save.py [--model DIR] [--preset fp8-dynamic] [--pairs 2]

Each run is a process of its own: it loads the model (the built-in one by default; --model var/bench/models/
llama-3.2-1b-random for the 1 B one, bench/random_model.py), compresses it with the data-free preset, then times
only the save, and reads its own /proc/self/io around it (bytes read and written by system calls: the same on a
loaded machine as on an idle one):
- bare: save_pretrained(out, save_compressed=True) and the tokenizer, as bench/bare_oneshot.py saves;
- service: the same inside engine.artifacts.hashed_weights (each shard hashed as it is written), then the
  manifest (write_manifest with those hashes: only the small files are read);
- reread: the same save, then the manifest reading every file back (the engine's way before hashed_weights).
Runs alternate bare, service, reread; figures are ratios of medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BENCH_DIR, MODEL_STORE, PYTHON, REPO, Figure, median, verdict  # noqa: E402
from engine.spec import BUILTIN_MODEL  # noqa: E402

VARIANTS = ("bare", "service", "reread")
RESULT = "SAVE_RESULT "


def _io() -> dict[str, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {key: int(fields[key]) for key in ("rchar", "wchar")}


def child(variant: str, model_dir: Path, preset: str, out: Path) -> dict:
    """One run in this process: load, compress data-free, then the timed save of `variant`."""
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.artifacts import hashed_weights, write_manifest
    from engine.preflight import preflight
    from engine.spec import CalibrationSpec, CompressionSpec

    recipe = preflight(
        CompressionSpec(model=str(model_dir), preset=preset, calibration=CalibrationSpec(kind="none"), device="cpu")
    ).recipe_yaml
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    oneshot(model=model, recipe=recipe)
    shutil.rmtree(out, ignore_errors=True)
    before, started = _io(), time.perf_counter()
    if variant == "service":
        with hashed_weights(out) as hashes:
            model.save_pretrained(out, save_compressed=True)
        tokenizer.save_pretrained(out)
        write_manifest(out, hashed=hashes)
    else:
        model.save_pretrained(out, save_compressed=True)
        tokenizer.save_pretrained(out)
        if variant == "reread":
            write_manifest(out)
    seconds, after = time.perf_counter() - started, _io()
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    return {"save_s": seconds, "read": after["rchar"] - before["rchar"], "written": after["wchar"] - before["wchar"],
            "weights": weights}  # fmt: skip


def one_run(variant: str, model_dir: Path, preset: str) -> dict:
    command = [str(PYTHON), str(Path(__file__).resolve()), "--child", variant, "--model", str(model_dir)]
    command += ["--preset", preset]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(RESULT)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"save run '{variant}' failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(line[len(RESULT) :])


def run(*, model_dir: Path = MODEL_STORE / BUILTIN_MODEL, preset: str = "fp8-dynamic", pairs: int = 2) -> list[Figure]:
    rows: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for index in range(pairs):
        for variant in VARIANTS:
            rows[variant].append(one_run(variant, model_dir, preset))
        times = ", ".join(f"{variant} {rows[variant][-1]['save_s']:.2f} s" for variant in VARIANTS)
        print(f"  [{index + 1}/{pairs}] {times}", flush=True)

    def med(variant: str, key: str) -> float:
        return median(r[key] for r in rows[variant])

    bare, service, reread = (med(v, "save_s") for v in VARIANTS)
    weights = med("bare", "weights")
    mb = 1e6
    return [
        Figure(
            "save",
            f"Save {preset}, {model_dir.name}: service (hashed as written + manifest) / bare save_pretrained",
            "<= 1.0",
            f"{service:.2f} s vs {bare:.2f} s",
            service / bare,
            verdict(service / bare <= 1.0),
            [
                "pairs (s) bare/service/reread: "
                + ", ".join(
                    f"{b['save_s']:.2f}/{s['save_s']:.2f}/{r['save_s']:.2f}"
                    for b, s, r in zip(rows["bare"], rows["service"], rows["reread"], strict=True)
                ),  # fmt: skip
                f"weights {weights / mb:.0f} MB; bytes read by the save: bare {med('bare', 'read') / mb:.1f} MB, "
                f"service {med('service', 'read') / mb:.1f} MB, reread {med('reread', 'read') / mb:.1f} MB "
                "(the manifest reading the shards back)",
                f"bytes written: bare {med('bare', 'written') / mb:.1f} MB, "
                f"service {med('service', 'written') / mb:.1f} MB",
                f"the engine's way before hashed_weights (save, then the manifest reads every file): {reread:.2f} s "
                f"= {reread / bare:.2f} x bare",
            ],
        )
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL_STORE / BUILTIN_MODEL, help="a bf16 model folder")
    parser.add_argument("--preset", default="fp8-dynamic", help="a data-free preset (fp8-dynamic)")
    parser.add_argument("--pairs", type=int, default=2, help="rounds of bare, service, reread (2)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child(args.child, args.model, args.preset, BENCH_DIR / "save" / args.child)
        print(RESULT + json.dumps(result), flush=True)
        return 0
    for figure in run(model_dir=args.model, preset=args.preset, pairs=args.pairs):
        print(f"{figure.name}: {figure.measured} (ratio {figure.ratio_text}) [{figure.verdict}]")
        print("\n".join(f"- {line}" for line in figure.details))
    return 0


if __name__ == "__main__":
    sys.exit(main())
