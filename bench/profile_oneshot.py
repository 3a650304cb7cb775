"""Where the oneshot time goes: the service's calibrate-and-compress stage against the bare script's, profiled in
one process, so that what differs is the code and not the machine's load.

    .venv/bin/python bench/profile_oneshot.py [--layers 4] [--preset int8-w8a8-gptq] [--rounds 2]

The model: the built-in model's shape (SmolLM2-135M: hidden 576, 9 heads, MLP 1536) with --layers decoder
layers and random weights, built once into var/bench/models: each layer's work is the real model's, there are
fewer of them, so a loaded 2-core machine runs it in minutes. The calibration set: the built-in one, 32 x 256
tokens (the API's defaults), tokenized once by the engine for the bare run, as bench/prepare_inputs.py does.

- bare: from_pretrained, the pre-tokenized set (datasets' load_from_disk), oneshot (bench/bare_oneshot.py's steps);
- service: engine.runner.compress with a progress callback and a resume folder, as a worker runs a job.

Rounds alternate bare, service; the first round warms the imports up (as the bench's warm-up job does) and
is not reported. Each run is under cProfile, with the time the garbage collector took (gc.callbacks) and the
bytes written to the resume folder. Prints a markdown breakdown: each item as a share of its run's
calibrate-and-compress time, so the load on the machine cancels out of the comparison.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BENCH_DIR, MODEL_STORE  # noqa: E402
from engine.spec import BUILTIN_MODEL  # noqa: E402

# (file suffix, function name) -> what the row calls it; cumulative times from cProfile.
SERVICE_PARTS = {
    ("llmcompressor/entrypoints/oneshot.py", "oneshot"): "llm-compressor's oneshot",
    ("engine/calibration.py", "tokenize_records"): "tokenizing the calibration records",
    ("engine/layer_resume.py", "resume_fingerprint"): "the resume fingerprint",
    ("engine/layer_resume.py", "save"): "resume snapshots: LayerStore.save",
    ("engine/layer_resume.py", "_compressed_state"): "  of which copying the layer's tensors",
    ("engine/layer_resume.py", "_write_atomically"): "  of which writing + fsync",
    ("~", "<built-in method posix.fsync>"): "    of which fsync",
    ("engine/runner.py", "hook"): "the layer-progress hook",
    ("engine/stages.py", "exit_and_record"): "the per-layer error hook",
    ("engine/stages.py", "sink"): "llm-compressor's log lines to the job log",
}
BARE_PARTS = {
    ("llmcompressor/entrypoints/oneshot.py", "oneshot"): "llm-compressor's oneshot",
    ("datasets/load.py", "load_from_disk"): "load_from_disk (the pre-tokenized set)",
}


def ensure_model(layers: int) -> Path:
    """The built-in model's shape with `layers` decoder layers and random weights (seed 0), built once."""
    target = BENCH_DIR / "models" / f"builtin-shape-{layers}-layers"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    builtin = MODEL_STORE / BUILTIN_MODEL
    config = AutoConfig.from_pretrained(builtin)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(builtin).save_pretrained(tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class GcClock:
    """The garbage collector's passes and the time they took, while installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.passes = [0, 0, 0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.passes[info["generation"]] += 1

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)


def cumulative(profile: cProfile.Profile, parts: dict) -> dict[str, tuple[float, int]]:
    """Each part's cumulative seconds and call count (summed over the functions that match it)."""
    stats = pstats.Stats(profile).stats
    found: dict[str, tuple[float, int]] = {}
    for (filename, _line, name), (_cc, calls, _tt, cum, _callers) in stats.items():
        for (suffix, wanted), label in parts.items():
            if name == wanted and filename.endswith(suffix):
                seconds, count = found.get(label, (0.0, 0))
                found[label] = (seconds + cum, count + calls)
    return found


def bare_run(model: Path, recipe: str, dataset_dir: Path, max_seq_len: int) -> dict:
    import torch
    from datasets import load_from_disk
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_obj = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(model)
    profile = cProfile.Profile()
    with GcClock() as clock:
        started = time.perf_counter()
        profile.enable()
        dataset = load_from_disk(str(dataset_dir))
        calibration = {"num_calibration_samples": len(dataset), "max_seq_length": max_seq_len}
        oneshot(model=model_obj, tokenizer=tokenizer, recipe=recipe, dataset=dataset, **calibration,
                shuffle_calibration_samples=False)  # fmt: skip
        profile.disable()
        stage_s = time.perf_counter() - started
    return {"stage_s": stage_s, "parts": cumulative(profile, BARE_PARTS), "gc": clock, "profile": profile}


def service_run(model: Path, preset: str, work: Path) -> dict:
    from engine.runner import compress
    from engine.spec import CalibrationSpec, CompressionSpec

    events: list = []
    resume = work / "resume"
    out = work / "out"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec = CompressionSpec(model=str(model), preset=preset, calibration=CalibrationSpec(), device="cpu")
    profile = cProfile.Profile()
    written: list[int] = []

    # The resume folder is removed once the checkpoint is published: count its bytes as the last layer lands.
    from engine import layer_resume as resume_module

    original_save = resume_module.LayerStore.save

    def counting_save(self, index, tensors, errors):
        original_save(self, index, tensors, errors)
        written.append((self.folder / f"layer-{index:05d}.safetensors").stat().st_size)

    resume_module.LayerStore.save = counting_save
    try:
        with GcClock() as clock:
            profile.enable()
            result = compress(spec, out, progress=events.append, resume_dir=resume)
            profile.disable()
    finally:
        resume_module.LayerStore.save = original_save
    return {
        "stage_s": result.timings["compress_s"],
        "timings": result.timings,
        "parts": cumulative(profile, SERVICE_PARTS),
        "gc": clock,
        "snapshot_bytes": sum(written),
        "snapshots": len(written),
        "events": len(events),
        "profile": profile,
    }


def prepare(model: Path, preset: str, work: Path) -> tuple[str, Path, int]:
    """The recipe preflight resolves and the tokenized calibration set, as bench/prepare_inputs.py makes them."""
    from transformers import AutoTokenizer

    from engine import calibration as calib
    from engine.preflight import preflight
    from engine.spec import CalibrationSpec, CompressionSpec

    spec_cal = CalibrationSpec()
    report = preflight(CompressionSpec(model=str(model), preset=preset, calibration=spec_cal, device="cpu"))
    dataset = calib.tokenize_records(calib.load_records(spec_cal), AutoTokenizer.from_pretrained(model), spec_cal)
    target = work / "calibration"
    shutil.rmtree(target, ignore_errors=True)
    dataset.save_to_disk(str(target))
    return report.recipe_yaml, target, spec_cal.max_seq_len


def row(label: str, seconds: float, calls: int | None, stage_s: float) -> str:
    count = "" if calls is None else str(calls)
    return f"| {label} | {seconds:.2f} | {100 * seconds / stage_s:.1f} % | {count} |"


def report(bare: dict, service: dict) -> list[str]:
    lines = [
        f"- bare calibrate-and-compress (load_from_disk + oneshot): {bare['stage_s']:.1f} s",
        f"- service calibrate-and-compress (compress_s: tokenizing + oneshot with the service's hooks): "
        f"{service['stage_s']:.1f} s; service / bare {service['stage_s'] / bare['stage_s']:.3f}",
        f"- service resume snapshots: {service['snapshots']} layers, {service['snapshot_bytes'] / 1e6:.1f} MB written",
        f"- progress events the callback received: {service['events']}",
        "",
        "| part | seconds | share of its run's stage | calls |",
        "|---|---|---|---|",
        "| **bare** | | | |",
    ]
    for label, (seconds, calls) in bare["parts"].items():
        lines.append(row(label, seconds, calls, bare["stage_s"]))
    gc_b = bare["gc"]
    lines.append(row(f"garbage collection (passes by generation {gc_b.passes})", gc_b.seconds, None, bare["stage_s"]))
    lines.append("| **service** | | | |")
    for label in SERVICE_PARTS.values():
        seconds, calls = service["parts"].get(label, (0.0, 0))
        lines.append(row(label, seconds, calls, service["stage_s"]))
    gc_s = service["gc"]
    lines.append(
        row(f"garbage collection (passes by generation {gc_s.passes})", gc_s.seconds, None, service["stage_s"])
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the built-in shape (4)")
    parser.add_argument("--preset", default="int8-w8a8-gptq")
    parser.add_argument("--rounds", type=int, default=2, help="bare, service pairs; the first is a warm-up (2)")
    parser.add_argument("--profile-out", type=Path, help="write the last service run's pstats here")
    args = parser.parse_args(argv)

    work = BENCH_DIR / "profile_oneshot"
    work.mkdir(parents=True, exist_ok=True)
    model = ensure_model(args.layers)
    recipe, dataset_dir, max_seq_len = prepare(model, args.preset, work)
    for round_ in range(args.rounds):
        bare = bare_run(model, recipe, dataset_dir, max_seq_len)
        service = service_run(model, args.preset, work / "service")
        label = "warm-up" if round_ == 0 and args.rounds > 1 else "measured"
        print(f"round {round_ + 1} ({label}): bare {bare['stage_s']:.1f} s, service {service['stage_s']:.1f} s")
    print(f"\n## {args.preset}, built-in shape with {args.layers} layers, 32 x 256 calibration tokens\n")
    print("\n".join(report(bare, service)))
    print("\n" + json.dumps({"service_timings": service["timings"]}))
    if args.profile_out:
        service["profile"].dump_stats(str(args.profile_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
