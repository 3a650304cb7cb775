"""Run one compression job: load, calibrate and compress with oneshot, save, evaluate, hash, publish.

Progress reaches the caller through one callback: stage changes, "layer i of N" from forward hooks
on the decoder layers, the evaluation's own steps, and llm-compressor's log lines. Each event carries
the whole job's fraction done, with the stages weighed by their measured cost (engine.stages, where the steps
a search's trials share with this run live). A spec with a search runs engine.search instead.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from engine import calibration as calib
from engine.artifacts import staging_folder, weights_bytes, write_manifest
from engine.errors import EngineError
from engine.evaluation import default_cache_dir, evaluate
from engine.model_cache import ModelCache
from engine.models import linearize_experts
from engine.plan import MemoryPlan, Placement, placed_model, plan_memory
from engine.preflight import PreflightReport, preflight
from engine.resources import WorkerCaps, detect_resources
from engine.resume import LayerStore, decoder_layers, resumable_layers, resume_fingerprint
from engine.search import search_compress
from engine.spec import CompressionResult, CompressionSpec, Stage
from engine.stages import (
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
    resume_dir: where each layer llm-compressor compressed is kept (engine.resume), so that a new run of the
    same work after an interruption resumes from them; removed once the checkpoint is published.
    A spec with a search (a quality floor, a sweep) runs engine.search's trials and writes the chosen one.
    """
    if spec.search is not None:
        return search_compress(
            spec,
            out_dir,
            progress=progress,
            should_cancel=should_cancel,
            store=store,
            caps=caps,
            model_cache=model_cache,
        )
    reporter = Reporter(progress, should_cancel)
    timings: dict[str, float] = {}
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise EngineError(f"The output folder '{out_dir}' already exists; choose a new one.", field="out")
    reporter.plan(spec, spec.calibration.kind != "none")  # refined once preflight knows the recipe
    reporter.emit(Stage.PREPARING, "Preparing: the model, the checks that need its weights, the calibration data")
    report = report or preflight(spec, store=store, progress=reporter.download, model_cache=model_cache)
    caps = caps or WorkerCaps()
    resources = detect_resources(out_dir.parent, device=spec.device, caps=caps)
    plan = plan_memory(
        report.footprint, resources, device=spec.device, gpus=spec.gpus, data_parallel=caps.data_parallel
    )
    reporter.emit(Stage.PREPARING, f"Memory plan: {plan.summary}")
    with staging_folder(out_dir) as staging, captured_logs(reporter):
        reporter.plan(spec, report.needs_calibration, passes=len(_calibrating_passes(report)))
        reporter.emit(Stage.LOADING, "Loading the model")
        # Offload folders live in the staging folder: removed after use, and with it if the run dies.
        placement = plan.placement(scratch=staging)
        _compress_and_save(spec, report, plan, placement, staging, reporter, timings, resume_dir)
        result = CompressionResult(
            output_dir=out_dir,
            size_before_bytes=report.model.weights_bytes,
            size_after_bytes=weights_bytes(staging),
            timings=timings,
            layer_errors=reporter.layer_errors,
            settings=run_settings(plan),
        )
        result.settings["vllm_check"] = check_in_vllm(staging, plan, reporter, timings)
        if spec.evaluation is not None:
            started = time.perf_counter()
            reporter.emit(Stage.EVALUATING, "Evaluating baseline and compressed model")
            result.evaluation = evaluate(
                spec.evaluation,
                baseline_dir=report.model.path,
                compressed_dir=staging,
                baseline_key=model_baseline_key(report),
                cache_dir=default_cache_dir(),
                placement=placement,
                progress=reporter.evaluation_progress,
            )
            timings["evaluate_s"] = time.perf_counter() - started
        started = time.perf_counter()
        reporter.emit(Stage.HASHING, "Writing the model card and hashing the files")
        write_card(staging, spec, report, result)
        (staging / "results.json").write_text(json.dumps(results_payload(spec, report, result), indent=2))
        result.manifest = write_manifest(staging, model=spec.model, preset=spec.preset)
        timings["hash_s"] = time.perf_counter() - started
    if resume_dir is not None:
        shutil.rmtree(resume_dir, ignore_errors=True)  # the checkpoint is complete: nothing left to resume
    reporter.emit(Stage.DONE, f"Checkpoint ready in {out_dir}")
    return result


def _compress_and_save(
    spec: CompressionSpec,
    report: PreflightReport,
    plan: MemoryPlan,
    placement: Placement,
    staging: Path,
    reporter: Reporter,
    timings: dict[str, float],
    resume_dir: Path | None,
) -> None:
    """Load the model as the plan says, run llm-compressor on it and write the checkpoint into staging."""
    from transformers import AutoTokenizer

    if plan.data_parallel > 1:
        _compress_data_parallel(spec, report, plan, staging, reporter, timings, resume_dir)
        return
    started = time.perf_counter()
    model_path = report.model.path
    loading = {"trust_remote_code": spec.trust_remote_code, "use_safetensors": not spec.allow_pickle}
    with placed_model(model_path, placement, **loading) as model:
        linearize_experts(model, report.model.config)
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=spec.trust_remote_code)
        timings["load_s"] = time.perf_counter() - started

        started = time.perf_counter()
        dataset = _calibration_dataset(spec, report, tokenizer, reporter)
        resumable = _resumable(model, report, plan, dataset, resume_dir, reporter)
        passes = _calibrating_passes(report) if dataset is not None else []
        with layer_progress(model, reporter, passes), layer_error_hooks(model, reporter), resumable:
            run_oneshot(model, tokenizer, report, spec, dataset, reporter)
        timings["compress_s"] = time.perf_counter() - started

        started = time.perf_counter()
        reporter.emit(Stage.SAVING, "Writing the compressed checkpoint")
        # With disk offload each shard is gathered in host memory before it is written: keep them small.
        shards = {"max_shard_size": plan.shard_bytes} if plan.shard_bytes else {}
        model.save_pretrained(staging, save_compressed=True, **shards)
        tokenizer.save_pretrained(staging)
        (staging / "recipe.yaml").write_text(report.recipe_yaml)
        timings["save_s"] = time.perf_counter() - started
    del model
    gc.collect()


def _compress_data_parallel(
    spec: CompressionSpec,
    report: PreflightReport,
    plan: MemoryPlan,
    staging: Path,
    reporter: Reporter,
    timings: dict[str, float],
    resume_dir: Path | None,
) -> None:
    """The plan's data-parallel calibration: the ranks load the model, calibrate and write the checkpoint
    (engine.data_parallel), keeping each compressed layer in resume_dir as one process does; the tokenizer
    and the recipe are added here, and the per-layer errors the ranks measured to the results."""
    from transformers import AutoTokenizer

    from engine.data_parallel import calibrate_data_parallel

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(report.model.path, trust_remote_code=spec.trust_remote_code)
    # The fingerprint names the ranks too: each sums its share's Hessians, so layers stored by another number
    # of ranks differ from what this run computes by GPTQ's rounding.
    dataset = _calibration_dataset(spec, report, tokenizer, reporter)
    fingerprint = _resume_fingerprint(report, plan, dataset, resume_dir, ranks=plan.data_parallel)
    reporter.emit(Stage.CALIBRATING, f"Calibrating and compressing over {plan.data_parallel} data-parallel ranks")
    layer_errors = calibrate_data_parallel(
        model_path=report.model.path,
        recipe_yaml=report.recipe_yaml,
        records=report.calibration_records,
        calibration=spec.calibration,
        out_dir=staging,
        ranks=plan.data_parallel,
        device="cpu" if plan.device == "cpu" else "cuda",
        gpus=[gpu.index for gpu in plan.gpus],
        trust_remote_code=spec.trust_remote_code,
        on_line=reporter.log,
        on_wait=reporter.check_cancel,
        resume={"dir": str(resume_dir), "fingerprint": fingerprint} if fingerprint else None,
    )
    reporter.layer_errors.extend(layer_errors)
    timings["compress_s"] = time.perf_counter() - started
    tokenizer.save_pretrained(staging)
    (staging / "recipe.yaml").write_text(report.recipe_yaml)


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


RESUMABLE_MODIFIERS = ("GPTQModifier", "QuantizationModifier", "SparseGPTModifier")


@contextmanager
def _resumable(model, report: PreflightReport, plan: MemoryPlan, dataset, resume_dir: Path | None, reporter: Reporter):
    """Keep each compressed layer in resume_dir and skip those a run of the same work left there.

    Only for recipes that calibrate in one sequential pass (with two calibrating modifiers, SmoothQuant then
    GPTQ say, llm-compressor runs a pass for each, and a layer's state after the first is not what a resumed
    second pass could start from), by a modifier that compresses at a layer's epoch end exactly the modules
    whose hooks saw data (RESUMABLE_MODIFIERS: what engine.resume relies on to skip a restored layer).
    """
    fingerprint = _resume_fingerprint(report, plan, dataset, resume_dir, ranks=1)
    if fingerprint is None:
        yield
        return
    store = LayerStore(resume_dir, fingerprint, total=len(decoder_layers(model)))

    def announce(line: str) -> None:
        reporter.emit(reporter.stage, line)

    with resumable_layers(model, store, layer_errors=reporter.layer_errors, announce=announce):
        yield


def _resume_fingerprint(
    report: PreflightReport, plan: MemoryPlan, dataset, resume_dir: Path | None, *, ranks: int
) -> str | None:
    """What stored layers must match for this run to use them (engine.resume); None when it does not resume."""
    calibrating = _calibrating_passes(report) if dataset is not None else []
    if resume_dir is None or len(calibrating) != 1 or calibrating[0] not in RESUMABLE_MODIFIERS:
        return None
    device = run_settings(plan)["device"]
    return resume_fingerprint(
        recipe_yaml=report.recipe_yaml,
        model_key=model_baseline_key(report),
        calibration_ids=[list(ids) for ids in dataset["input_ids"]],
        device=device if ranks == 1 else f"{device}, {ranks} data-parallel ranks",
    )
