"""Run one compression job: load, calibrate and compress with oneshot, save, evaluate, hash, publish.

Progress reaches the caller through one callback: stage changes, "layer i of N" from forward hooks
on the decoder layers, the evaluation's own steps, and llm-compressor's log lines. Each event carries
the whole job's fraction done, with the stages weighed by their measured cost (engine.stages, where the steps
a search's trials share with this run live). A spec with a search runs the same pipeline, its checkpoint
produced by engine.search's trials (a Run hands them the steps they share with a plain run).
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from engine import calibration as calib
from engine.architectures import linearize_experts
from engine.artifacts import copy_processor_files, hashed_weights, staging_folder, weights_bytes, write_manifest
from engine.errors import EngineError
from engine.evaluation import default_cache_dir, evaluate
from engine.model_cache import ModelCache
from engine.plan import placed_model, plan_memory, search_plan
from engine.preflight import PreflightReport, preflight
from engine.resources import WorkerCaps, detect_resources
from engine.run import Run
from engine.search import prepare_search, search_checkpoint
from engine.spec import CompressionResult, CompressionSpec, Stage
from engine.stages import (
    Checkpoint,
    ProgressCallback,
    Reporter,
    captured_logs,
    check_in_vllm,
    layer_error_hooks,
    layer_progress,
    model_baseline_key,
    results_payload,
    run_oneshot,
    run_settings,
    write_card,
)


def compress(
    spec: CompressionSpec,
    out_dir: Path,
    *,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    store: Path | None = None,
    report: PreflightReport | None = None,
    caps: WorkerCaps | None = None,
    model_cache: ModelCache | None = None,
    resume_dir: Path | None = None,
) -> CompressionResult:
    """Compress spec.model into out_dir (which must not exist yet); return what was produced.

    caps: the operator's limits on this worker's resources (COMPRESSOR_WORKER_*), which the memory plan obeys.
    model_cache: the node's cache a hub model comes from; the caller keeps it open until the run is over.
    resume_dir: where each layer llm-compressor compressed is kept (engine.layer_resume), so that a new run of the
    same work after an interruption resumes from them; removed once the checkpoint is published.
    A spec with a search (a quality floor, a sweep) produces its checkpoint by engine.search's trials; the
    steps before and after (preflight, plan, vLLM check, evaluation, card, hashes) are the same.
    """
    reporter = Reporter(progress, should_cancel)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise EngineError(f"The output folder '{out_dir}' already exists; choose a new one.", field="out")
    reporter.plan(spec, spec.calibration.kind != "none")  # refined once preflight knows the recipe
    reporter.emit(Stage.PREPARING, "Preparing: the model, the checks that need its weights, the calibration data")
    report = report or preflight(spec, store=store, progress=reporter.download, model_cache=model_cache)
    if spec.search is not None:
        spec = prepare_search(spec, report)
    caps = caps or WorkerCaps()
    resources = detect_resources(out_dir.parent, device=spec.device, caps=caps)
    planner = plan_memory if spec.search is None else search_plan
    plan = planner(report.footprint, resources, device=spec.device, gpus=spec.gpus, data_parallel=caps.data_parallel)
    reporter.emit(Stage.PREPARING, f"Memory plan: {plan.summary}")
    with staging_folder(out_dir) as staging, captured_logs(reporter):
        reporter.plan(spec, report.needs_calibration, passes=len(_calibrating_passes(report)))
        # Offload folders live in the staging folder: removed after use, and with it if the run dies.
        run = Run(spec, report, plan, plan.placement(scratch=staging), staging, reporter, {}, resume_dir)
        produced = _compress_and_save(run) if spec.search is None else search_checkpoint(run)
        copy_processor_files(report.model.path, staging)
        result = CompressionResult(
            output_dir=out_dir,
            size_before_bytes=report.model.weights_bytes,
            size_after_bytes=weights_bytes(staging),
            timings=run.timings,
            layer_errors=produced.layer_errors,
            settings=run_settings(plan),
        )
        result.settings["vllm_check"] = check_in_vllm(staging, plan, reporter, run.timings)
        if spec.evaluation is not None:
            started = time.perf_counter()
            reporter.emit(Stage.EVALUATING, produced.evaluating)
            result.evaluation = evaluate(
                spec.evaluation,
                baseline_dir=report.model.path,
                compressed_dir=staging,
                baseline_key=model_baseline_key(report),
                cache_dir=default_cache_dir(),
                placement=run.placement,
                progress=reporter.evaluation_progress,
            )
            run.timings["evaluate_s"] = time.perf_counter() - started
        result.settings.update(produced.settings)
        started = time.perf_counter()
        reporter.emit(Stage.HASHING, "Writing the model card and hashing the files")
        write_card(staging, produced.spec, produced.report, result)
        payload = results_payload(produced.spec, produced.report, result)
        (staging / "results.json").write_text(json.dumps(payload, indent=2))
        result.manifest = write_manifest(staging, hashed=produced.hashed, model=spec.model, preset=produced.spec.preset)
        run.timings["hash_s"] = time.perf_counter() - started
    if resume_dir is not None:
        shutil.rmtree(resume_dir, ignore_errors=True)  # the checkpoint is complete: nothing left to resume
    reporter.emit(Stage.DONE, f"Checkpoint ready in {out_dir}{produced.done}")
    return result


def _compress_and_save(run: Run) -> Checkpoint:
    """A plain run's checkpoint: load the model as the plan says, run llm-compressor on it, write it to staging."""
    from transformers import AutoTokenizer

    spec, report, reporter, timings = run.spec, run.report, run.reporter, run.timings
    reporter.emit(Stage.LOADING, "Loading the model")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(report.model.path, trust_remote_code=spec.trust_remote_code)
    if run.plan.data_parallel > 1:
        dataset = _calibration_dataset(spec, report, tokenizer, reporter)
        reporter.layer_errors.extend(
            run.compress_data_parallel(report, spec.calibration, dataset, run.staging, run.resume_dir)
        )
        timings["compress_s"] = time.perf_counter() - started
        tokenizer.save_pretrained(run.staging)
        (run.staging / "recipe.yaml").write_text(report.recipe_yaml)
        return Checkpoint(spec, report, reporter.layer_errors)
    loading = {"trust_remote_code": spec.trust_remote_code, "use_safetensors": not spec.allow_pickle}
    with placed_model(report.model.path, run.placement, **loading) as model:
        linearize_experts(model, report.model.config)
        timings["load_s"] = time.perf_counter() - started

        started = time.perf_counter()
        dataset = _calibration_dataset(spec, report, tokenizer, reporter)
        passes = _calibrating_passes(report) if dataset is not None else []
        with (
            layer_progress(model, reporter, passes),
            layer_error_hooks(model, reporter),
            run.resumable(model, report, dataset, reporter, run.resume_dir),
        ):
            run_oneshot(model, tokenizer, report, spec, dataset, reporter)
        timings["compress_s"] = time.perf_counter() - started

        started = time.perf_counter()
        reporter.emit(Stage.SAVING, "Writing the compressed checkpoint")
        # With disk offload each shard is gathered in host memory before it is written: keep them small.
        shards = {"max_shard_size": run.plan.shard_bytes} if run.plan.shard_bytes else {}
        with hashed_weights(run.staging) as hashed:  # each shard hashed as it is written, never read back
            model.save_pretrained(run.staging, save_compressed=True, **shards)
        tokenizer.save_pretrained(run.staging)
        (run.staging / "recipe.yaml").write_text(report.recipe_yaml)
        timings["save_s"] = time.perf_counter() - started
    del model
    gc.collect()
    return Checkpoint(spec, report, reporter.layer_errors, hashed=hashed)


def _calibration_dataset(spec: CompressionSpec, report: PreflightReport, tokenizer, reporter: Reporter):
    if not report.needs_calibration:
        return None
    reporter.emit(
        Stage.CALIBRATING, "Tokenizing calibration data (llm-compressor calibrates and compresses each layer)"
    )
    return calib.tokenize_records(report.calibration_records, tokenizer, spec.calibration)


def _calibrating_passes(report: PreflightReport) -> list[str]:
    """The recipe's modifiers that calibrate, each making a pass over the calibration data of its own."""
    from engine.presets import recipe_calibrating_modifiers

    return recipe_calibrating_modifiers(report.recipe_yaml) if report.needs_calibration else []
