"""Run one compression job: load, calibrate and compress with oneshot, save, hash, publish.

Progress reaches the caller through one callback: stage changes, "layer i of N" from forward hooks
on the decoder layers, and llm-compressor's own log lines (its METRIC lines carry per-layer errors).
"""

from __future__ import annotations

import gc
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine import calibration as calib
from engine.artifacts import check_free_space, staging_folder, weights_bytes, write_manifest
from engine.card import write_model_card
from engine.errors import CancelledError, EngineError
from engine.evaluation import default_cache_dir, evaluate
from engine.preflight import PreflightReport, preflight
from engine.presets import PRESETS
from engine.spec import CompressionResult, CompressionSpec, ProgressEvent

ProgressCallback = Callable[[ProgressEvent], None]
_ERROR_LINE = re.compile(r"^error ([0-9.eE+-]+)")


class _Reporter:
    """Forwards progress to the caller and raises CancelledError when the caller asks to stop."""

    def __init__(self, callback: ProgressCallback | None, should_cancel: Callable[[], bool] | None) -> None:
        self.callback = callback
        self.should_cancel = should_cancel
        self.stage = "loading"
        self.layer_errors: list[dict[str, Any]] = []

    def emit(self, stage: str, message: str = "", **fields: Any) -> None:
        self.stage = stage
        self.check_cancel()
        if self.callback:
            self.callback(ProgressEvent(stage=stage, message=message, **fields))

    def log(self, line: str) -> None:
        if self.callback:
            self.callback(ProgressEvent(stage=self.stage, log_line=line))

    def check_cancel(self) -> None:
        if self.should_cancel and self.should_cancel():
            raise CancelledError("The job was cancelled.")


def compress(
    spec: CompressionSpec,
    out_dir: Path,
    *,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    store: Path | None = None,
    report: PreflightReport | None = None,
) -> CompressionResult:
    """Compress spec.model into out_dir (which must not exist yet); return what was produced."""
    reporter = _Reporter(progress, should_cancel)
    timings: dict[str, float] = {}
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise EngineError(f"The output folder '{out_dir}' already exists; choose a new one.", field="out")
    reporter.emit("loading", "Checking the job")
    report = report or preflight(spec, store=store)
    check_free_space(out_dir.parent, weights_bytes=report.model.weights_bytes)
    with staging_folder(out_dir) as staging, _captured_logs(reporter):
        started = time.perf_counter()
        model, tokenizer = _load(report, spec)
        timings["load_s"] = time.perf_counter() - started

        started = time.perf_counter()
        dataset = _calibration_dataset(spec, report, tokenizer, reporter)
        with _layer_progress(model, reporter):
            _oneshot(model, tokenizer, report, spec, dataset, reporter)
        timings["compress_s"] = time.perf_counter() - started

        started = time.perf_counter()
        reporter.emit("saving", "Writing the compressed checkpoint")
        model.save_pretrained(staging, save_compressed=True)
        tokenizer.save_pretrained(staging)
        (staging / "recipe.yaml").write_text(report.recipe_yaml)
        timings["save_s"] = time.perf_counter() - started
        del model
        gc.collect()

        result = CompressionResult(
            output_dir=out_dir,
            size_before_bytes=report.model.weights_bytes,
            size_after_bytes=weights_bytes(staging),
            timings=timings,
            layer_errors=reporter.layer_errors,
        )
        if spec.evaluation is not None:
            started = time.perf_counter()
            reporter.emit("evaluating", "Evaluating baseline and compressed model")
            result.evaluation = evaluate(
                spec.evaluation,
                baseline_dir=report.model.path,
                compressed_dir=staging,
                baseline_key=_baseline_key(report),
                cache_dir=default_cache_dir(),
                device=_eval_device(spec.device),
                progress=reporter.callback,
            )
            timings["evaluate_s"] = time.perf_counter() - started
        _write_card(staging, spec, report, result)
        (staging / "results.json").write_text(json.dumps(_results_payload(spec, report, result), indent=2))
        started = time.perf_counter()
        reporter.emit("saving", "Hashing the files")
        result.manifest = write_manifest(staging, model=spec.model, preset=spec.preset)
        timings["hash_s"] = time.perf_counter() - started
    reporter.emit("done", f"Checkpoint ready in {out_dir}", step=1, total=1)
    return result


def _load(report: PreflightReport, spec: CompressionSpec):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        report.model.path,
        dtype=torch.bfloat16,
        trust_remote_code=spec.trust_remote_code,
        use_safetensors=not spec.allow_pickle,
    )
    tokenizer = AutoTokenizer.from_pretrained(report.model.path, trust_remote_code=spec.trust_remote_code)
    return model, tokenizer


def _calibration_dataset(spec: CompressionSpec, report: PreflightReport, tokenizer, reporter: _Reporter):
    if not report.needs_calibration:
        return None
    reporter.emit("calibrating", "Preparing calibration data")
    records = calib.load_records(spec.calibration)
    return calib.tokenize_records(records, tokenizer, spec.calibration)


def _oneshot(model, tokenizer, report: PreflightReport, spec: CompressionSpec, dataset, reporter: _Reporter):
    from llmcompressor import oneshot

    reporter.emit("compressing" if dataset is None else "calibrating", "Running llm-compressor")
    kwargs: dict[str, Any] = {}
    if dataset is not None:
        kwargs = {
            "dataset": dataset,
            "num_calibration_samples": len(dataset),
            "max_seq_length": spec.calibration.max_seq_len,
            # The samples are already chosen; keep their order so that reruns give the same checkpoint.
            "shuffle_calibration_samples": False,
        }
    oneshot(model=model, tokenizer=tokenizer, recipe=report.recipe_yaml, **kwargs)


@contextmanager
def _layer_progress(model, reporter: _Reporter) -> Iterator[None]:
    """Report "layer i of N" as calibration reaches each decoder layer (and check for cancel there)."""
    layers = getattr(getattr(model, "model", model), "layers", None) or []
    total = len(layers)
    seen: set[int] = set()

    def hook_for(index: int):
        def hook(_module, _args):
            if index not in seen:
                seen.add(index)
                reporter.emit("calibrating", f"Layer {index + 1} of {total}", step=index + 1, total=total)
            else:
                reporter.check_cancel()

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _captured_logs(reporter: _Reporter) -> Iterator[None]:
    """Forward llm-compressor's loguru lines; keep its METRIC "error" lines as per-layer errors."""
    from loguru import logger

    def sink(message) -> None:
        record = message.record
        text = record["message"]
        if record["level"].name == "METRIC":
            match = _ERROR_LINE.match(text)
            if match:
                reporter.layer_errors.append({"module": record["function"], "error": float(match.group(1))})
        reporter.log(f"{record['level'].name}: {text}")

    handler = logger.add(sink, level="INFO", format="{message}")
    try:
        yield
    finally:
        logger.remove(handler)


def _baseline_key(report: PreflightReport) -> str:
    """Identifies the baseline weights: name, revision, and each weight file's size and mtime."""
    files = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in report.model.path.glob("*.safetensors"))
    return json.dumps([report.model.name, report.model.revision, str(report.model.path), files])


def _eval_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _write_card(staging: Path, spec: CompressionSpec, report: PreflightReport, result) -> None:
    suffix = spec.preset or "custom"
    write_model_card(
        staging,
        model_name=f"{Path(report.model.name).name}-{suffix}",  # like the seed cards: base name + scheme
        base_model=report.model.name,
        architecture=report.model.architecture,
        preset=PRESETS.get(spec.preset or ""),
        recipe_yaml=report.recipe_yaml,
        calibration=spec.calibration if report.needs_calibration else None,
        evaluation=result.evaluation,
        size_before_bytes=result.size_before_bytes,
        size_after_bytes=result.size_after_bytes,
    )


def _results_payload(spec: CompressionSpec, report: PreflightReport, result: CompressionResult) -> dict:
    return {
        "model": spec.model,
        "revision": spec.revision,
        "preset": spec.preset,
        "architecture": report.model.architecture,
        "num_parameters": report.num_parameters,
        "calibration": spec.to_dict()["calibration"] if report.needs_calibration else None,
        "ignored_layers": report.extra_ignore,
        **result.to_dict(),
    }
