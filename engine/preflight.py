"""Preflight: the worker's first stage, "preparing": the checks that need the weights, the download of a hub
model (at the commit pinned at submission, bytes i of N), and the calibration data.

The submission check (engine.submission) already ran in the web process and recorded the recipe; the worker
runs exactly that recipe. Each failure is one PreflightError whose message says what is wrong and what to
do, and whose field names the part of the request it concerns (model, preset, recipe, calibration), in the
same words the form and the API show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.architectures import auto_model_class, is_vision_language
from engine.errors import EngineError, PreflightError
from engine.hub import DownloadProgress
from engine.model_cache import ModelCache
from engine.model_sources import ResolvedModel, resolve_model
from engine.plan import ModelFootprint, model_footprint
from engine.presets import get_preset, recipe_needs_calibration, recipe_uses_hessians, validate_recipe_yaml
from engine.spec import CompressionSpec
from engine.submission import (
    Layers,
    check_calibration,
    check_recipe_divides,
    check_submission,
    fit_preset,
    not_a_causal_lm,
)


@dataclass
class PreflightReport:
    """What preflight learned and fetched; the runner uses it instead of checking or loading again."""

    model: ResolvedModel
    recipe_yaml: str
    extra_ignore: list[str] = field(default_factory=list)
    num_parameters: int = 0
    needs_calibration: bool = False
    calibration_rows: int = 0
    calibration_records: list[dict[str, Any]] = field(default_factory=list)
    footprint: ModelFootprint | None = None  # the memory plan's input (engine.plan): the runner plans before loading
    warnings: list[str] = field(default_factory=list)


def preflight(
    spec: CompressionSpec,
    *,
    store: Path | None = None,
    progress: DownloadProgress | None = None,
    model_cache: ModelCache | None = None,
) -> PreflightReport:
    """Prepare a job; raise PreflightError (with .field) when it cannot succeed.

    spec.resolved_recipe is the recipe recorded at submission, and spec.revision the commit pinned then; a
    spec without one (the engine's own CLI) goes through the submission check here first. A hub model comes
    from the node's model_cache when the worker has one (the caller keeps it open for the whole run).
    """
    try:
        return _preflight(spec, store, progress, model_cache)
    except PreflightError:
        raise
    except EngineError as exc:
        raise PreflightError(exc.message, field=exc.field) from None


def _preflight(
    spec: CompressionSpec, store: Path | None, progress: DownloadProgress | None, model_cache: ModelCache | None
) -> PreflightReport:
    recipe_yaml, revision = spec.resolved_recipe, spec.revision
    if recipe_yaml is None:
        checked = check_submission(spec, store=store)
        recipe_yaml, revision = checked.recipe_yaml, checked.model.commit or spec.revision
    if spec.recipe_yaml:
        validate_recipe_yaml(spec.recipe_yaml)  # llm-compressor's own judgement needs torch: here, not in the web
    model = resolve_model(
        spec.model,
        revision,
        allow_pickle=spec.allow_pickle,
        trust_remote_code=spec.trust_remote_code,
        allow_local=spec.allow_local_paths,
        store=store,
        progress=progress,
        model_cache=model_cache,
    )
    _check_architecture(model)
    skeleton = _skeleton(model)
    layers = _linear_layers(skeleton)
    # The recorded recipe against the real modules: the header's shapes were judged at submission, but a
    # model without a header (pickle weights only) is first judged here, its preset fitted here.
    if spec.preset and recipe_yaml == get_preset(spec.preset).recipe_yaml():
        preset, ignore = fit_preset(get_preset(spec.preset), layers, spec.ignore_indivisible)
        recipe_yaml = preset.recipe_yaml(ignore)
    extra_ignore = check_recipe_divides(recipe_yaml, layers)
    needs_calibration = recipe_needs_calibration(recipe_yaml)
    footprint = model_footprint(
        skeleton,
        hessians=recipe_uses_hessians(recipe_yaml),
        samples=spec.calibration.samples if needs_calibration else 0,
        max_seq_len=spec.calibration.max_seq_len,
    )
    report = PreflightReport(
        model=model,
        recipe_yaml=recipe_yaml,
        extra_ignore=extra_ignore,
        num_parameters=footprint.num_parameters,
        needs_calibration=needs_calibration,
        footprint=footprint,
    )
    report.calibration_records = check_calibration(spec.calibration, report.needs_calibration, load_hub=True)
    report.calibration_rows = len(report.calibration_records)
    return report


def _check_architecture(model: ResolvedModel) -> None:
    """A causal LM, or a vision-language model transformers loads as image-text-to-text."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = model.config.get("model_type")
    architectures = model.config.get("architectures") or []
    mapping = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if is_vision_language(model.config) and model_type not in mapping:
        mapping = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    if model_type not in mapping or not any(a in set(mapping.values()) for a in architectures):
        raise not_a_causal_lm(model.name, model.config)


def _skeleton(model: ResolvedModel):
    """The model's modules on the meta device: shapes without memory, for the checks below."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model.path)
    with torch.device("meta"):
        return auto_model_class(model.config).from_config(config)


def _linear_layers(skeleton) -> Layers:
    """Each Linear module's input width and class names, which a recipe's targets and ignore may name."""
    import torch

    return {
        name: (m.in_features, tuple(cls.__name__ for cls in type(m).__mro__))
        for name, m in skeleton.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
