"""One compression as engine.runner's pipeline hands it to the step that produces the checkpoint (a plain run's
oneshot and save, or engine.search's trials), with the steps every such producer shares: resumable
compression of a loaded model (engine.layer_resume) and data-parallel calibration (engine.data_parallel).

Its own module so that the pipeline (engine.runner) and the search (engine.search) both import it, neither
the other.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.layer_resume import LayerStore, decoder_layers, resumable_layers, resume_fingerprint
from engine.plan import MemoryPlan, Placement
from engine.preflight import PreflightReport
from engine.spec import CalibrationSpec, CompressionSpec, Stage
from engine.stages import Reporter, model_baseline_key, run_settings


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
