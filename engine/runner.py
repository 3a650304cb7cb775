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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import calibration as calib
from engine.artifacts import copy_processor_files, hashed_weights, staging_folder, weights_bytes, write_manifest
from engine.errors import EngineError
from engine.evaluation import default_cache_dir, evaluate
from engine.layer_resume import LayerStore, decoder_layers, resumable_layers, resume_fingerprint
from engine.model_cache import ModelCache
from engine.model_sources import linearize_experts
from engine.plan import MemoryPlan, Placement, placed_model, plan_memory, search_plan
from engine.preflight import PreflightReport, preflight
from engine.resources import WorkerCaps, detect_resources
from engine.search import prepare_search, search_checkpoint
from engine.spec import CalibrationSpec, CompressionResult, CompressionSpec, Stage
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


@dataclass
class Run:
    """One compression as the pipeline hands it to the step that produces the checkpoint in staging (a plain
    run's _compress_and_save, or engine.search's trials), with the steps every such producer shares:
    resumable compression of a loaded model, and data-parallel calibration where the plan says."""

    spec: CompressionSpec
    report: PreflightReport
    plan: MemoryPlan
    placement: Placement
    staging: Path
    reporter: Reporter
    timings: dict[str, float]
    resume_dir: Path | None

    @contextmanager
    def resumable(self, model, report: PreflightReport, dataset, errors: Reporter, resume_dir: Path | None):
        """Keep each layer llm-compressor compresses in resume_dir and skip those a run of the same work (recipe,
        weights, calibration tokens, device) left there; their errors come back into `errors`.

        Only for recipes that calibrate in one sequential pass (with two calibrating modifiers, SmoothQuant then
        GPTQ say, llm-compressor runs a pass for each, and a layer's state after the first is not what a resumed
        second pass could start from), by a modifier that compresses at a layer's epoch end exactly the modules
        whose hooks saw data (RESUMABLE_MODIFIERS: what engine.layer_resume relies on to skip a restored layer).
        """
        fingerprint = _resume_fingerprint(report, self.plan, dataset, resume_dir, ranks=1)
        if fingerprint is None:
            yield
            return
        store = LayerStore(resume_dir, fingerprint, total=len(decoder_layers(model)))

        def announce(line: str) -> None:
            self.reporter.emit(self.reporter.stage, line)

        with resumable_layers(model, store, layer_errors=errors.layer_errors, announce=announce):
            yield

    def compress_data_parallel(
        self, report: PreflightReport, calibration: CalibrationSpec, dataset, out: Path, resume_dir: Path | None
    ) -> list[dict[str, Any]]:
        """The plan's data-parallel calibration of report's recipe on `calibration` (tokenized: dataset): the
        ranks load the model, calibrate and write the checkpoint into out (engine.data_parallel), keeping each
        compressed layer in resume_dir as one process does; return the per-layer errors the ranks measured."""
        from engine.data_parallel import calibrate_data_parallel

        ranks = self.plan.data_parallel
        # The fingerprint names the ranks too: each sums its share's Hessians, so layers stored by another number
        # of ranks differ from what this run computes by GPTQ's rounding.
        fingerprint = _resume_fingerprint(report, self.plan, dataset, resume_dir, ranks=ranks)
        self.reporter.emit(Stage.CALIBRATING, f"Calibrating and compressing over {ranks} data-parallel ranks")
        return calibrate_data_parallel(
            model_path=report.model.path,
            recipe_yaml=report.recipe_yaml,
            records=report.calibration_records,
            calibration=calibration,
            out_dir=out,
            ranks=ranks,
            device="cpu" if self.plan.device == "cpu" else "cuda",
            gpus=[gpu.index for gpu in self.plan.gpus],
            trust_remote_code=self.spec.trust_remote_code,
            on_line=self.reporter.log,
            on_wait=self.reporter.check_cancel,
            resume={"dir": str(resume_dir), "fingerprint": fingerprint} if fingerprint else None,
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


RESUMABLE_MODIFIERS = ("GPTQModifier", "QuantizationModifier", "SparseGPTModifier")


def _resume_fingerprint(
    report: PreflightReport, plan: MemoryPlan, dataset, resume_dir: Path | None, *, ranks: int
) -> str | None:
    """What stored layers must match for this run to use them (engine.layer_resume); None when it does not resume."""
    from engine.presets import recipe_calibrating_modifiers

    # The recipe's own passes: a sweep's trial may calibrate where the job's preset is data-free.
    calibrating = recipe_calibrating_modifiers(report.recipe_yaml) if dataset is not None else []
    if resume_dir is None or len(calibrating) != 1 or calibrating[0] not in RESUMABLE_MODIFIERS:
        return None
    device = run_settings(plan)["device"]
    return resume_fingerprint(
        recipe_yaml=report.recipe_yaml,
        model_key=model_baseline_key(report),
        calibration_ids=[list(ids) for ids in dataset["input_ids"]],
        device=device if ranks == 1 else f"{device}, {ranks} data-parallel ranks",
    )
