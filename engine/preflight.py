"""Preflight: everything that can be checked before a job takes a place in the queue.

Each failure is one PreflightError whose message says what is wrong and what to do, and whose
field names the part of the request it concerns (model, preset, recipe, calibration).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine import calibration as calib
from engine.errors import EngineError, PreflightError
from engine.lm_tasks import LOCAL_TASKS, known_task_names
from engine.models import ResolvedModel, hub_reachable, resolve_model
from engine.plan import ModelFootprint, model_footprint
from engine.presets import (
    get_preset,
    recipe_group_sizes,
    recipe_needs_calibration,
    recipe_uses_hessians,
    validate_recipe_yaml,
)
from engine.spec import CalibrationSpec, CompressionSpec, EvaluationSpec


@dataclass
class PreflightReport:
    """What preflight learned; the runner reuses it instead of checking again."""

    model: ResolvedModel
    recipe_yaml: str
    extra_ignore: list[str] = field(default_factory=list)
    num_parameters: int = 0
    needs_calibration: bool = False
    calibration_rows: int = 0
    footprint: ModelFootprint | None = None  # the memory plan's input; the worker plans before loading
    warnings: list[str] = field(default_factory=list)


def preflight(spec: CompressionSpec, *, store: Path | None = None) -> PreflightReport:
    """Check a job; raise PreflightError (with .field) when it cannot succeed."""
    try:
        return _preflight(spec, store)
    except PreflightError:
        raise
    except EngineError as exc:
        raise PreflightError(exc.message, field=exc.field) from None


def _preflight(spec: CompressionSpec, store: Path | None) -> PreflightReport:
    recipe_yaml = _base_recipe(spec)
    # What the request's text alone decides comes first: it costs nothing and needs no model.
    if spec.calibration.kind == "hub":
        calib.check_hub_dataset_id(spec.calibration.dataset)
    _check_tasks(spec.evaluation)
    model = resolve_model(
        spec.model,
        spec.revision,
        allow_pickle=spec.allow_pickle,
        trust_remote_code=spec.trust_remote_code,
        allow_local=spec.allow_local_paths,
        store=store,
    )
    _check_architecture(model)
    skeleton = _skeleton(model)
    extra_ignore = _check_group_sizes(skeleton, recipe_group_sizes(recipe_yaml), spec.ignore_indivisible)
    if extra_ignore:
        recipe_yaml = _recipe_with_ignore(spec, extra_ignore)
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
    report.calibration_rows = _check_calibration(spec, report.needs_calibration)
    return report


def _base_recipe(spec: CompressionSpec) -> str:
    if spec.preset and spec.recipe_yaml:
        raise PreflightError("Give either a preset or a custom recipe, not both.", field="recipe")
    if spec.preset:
        return get_preset(spec.preset).recipe_yaml()
    if spec.recipe_yaml:
        return validate_recipe_yaml(spec.recipe_yaml)
    raise PreflightError("Choose a preset or give a custom recipe.", field="preset")


def _recipe_with_ignore(spec: CompressionSpec, extra_ignore: list[str]) -> str:
    if spec.preset:
        return get_preset(spec.preset).recipe_yaml(extra_ignore)
    raise PreflightError(
        "Leaving indivisible layers unquantized is only automatic for presets; add them to your recipe's "
        f"ignore list: {', '.join(extra_ignore)}.",
        field="recipe",
    )


def _check_architecture(model: ResolvedModel) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = model.config.get("model_type")
    architectures = model.config.get("architectures") or []
    supported = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not any(a in supported for a in architectures):
        raise PreflightError(
            f"'{model.name}' is not a causal language model this service supports "
            f"(model_type={model_type!r}, architectures={architectures}).",
            field="model",
        )


def _skeleton(model: ResolvedModel):
    """The model's modules on the meta device: shapes without memory, for the checks below."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model.path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# The words of the option that leaves such layers unquantized, as the form's checkbox shows them.
IGNORE_INDIVISIBLE_LABEL = "Leave layers a grouped scheme cannot divide unquantized"


def _check_group_sizes(skeleton, group_sizes: set[int], ignore_indivisible: bool) -> list[str]:
    """Grouped schemes need each quantized layer's input columns divisible by the group size."""
    if not group_sizes:
        return []
    import torch

    bad = sorted(
        name
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear)
        and not name.endswith("lm_head")
        and any(module.in_features % size for size in group_sizes)
    )
    if not bad:
        return []
    if ignore_indivisible:
        return _compact_ignore(skeleton, bad)
    shown = ", ".join(sorted({re.sub(r"\.\d+\.", ".*.", name) for name in bad}))
    modules = dict(skeleton.named_modules())
    widths = ", ".join(str(width) for width in sorted({modules[name].in_features for name in bad}))
    raise PreflightError(
        f"Group size {', '.join(map(str, sorted(group_sizes)))} does not divide the input width ({widths}) of "
        f"{len(bad)} layers: {shown}. Choose another preset, or leave these layers unquantized: tick "
        f"“{IGNORE_INDIVISIBLE_LABEL}” on the form (ignore_indivisible in the API, --ignore-indivisible "
        "on the command line).",
        field="preset",
    )


def _compact_ignore(skeleton, bad: list[str]) -> list[str]:
    """Collapse per-layer names into llm-compressor 're:' patterns where a pattern matches only bad layers."""
    import torch

    linear = [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
    bad_set, compact = set(bad), []
    for pattern in sorted({_layer_pattern(name) for name in bad}):
        matches = {n for n in linear if re.fullmatch(pattern, n)}
        compact.extend([f"re:^{pattern}$"] if matches <= bad_set else sorted(matches & bad_set))
    return compact


def _layer_pattern(name: str) -> str:
    """model.layers.3.mlp.up_proj -> model\\.layers\\.\\d+\\.mlp\\.up_proj (numbered parts become \\d+)."""
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))


def _check_calibration(spec: CompressionSpec, needs_calibration: bool) -> int:
    cal = spec.calibration
    if not needs_calibration:
        return 0
    if cal.kind == "none":
        raise PreflightError(
            "This recipe needs calibration data (its scales or Hessians come from sample activations); "
            "choose the built-in set, upload a JSONL file or name a hub dataset.",
            field="calibration",
        )
    if cal.samples < 1 or cal.max_seq_len < 8:
        raise PreflightError("Use at least 1 sample of at least 8 tokens.", field="calibration")
    if cal.kind == "hub":
        return _check_hub_calibration(cal)
    rows = len(calib.load_records(cal))
    if rows < cal.samples:
        raise PreflightError(
            f"The calibration data has {rows} usable rows but {cal.samples} samples were requested.",
            field="calibration",
        )
    return rows


def _check_hub_calibration(cal: CalibrationSpec) -> int:
    """The hub's reachability only (the id was checked first): the worker loads the data when the job runs.

    Preflight also runs in the web process, which must never read a dataset (nor write the datasets cache).
    """
    if not hub_reachable():
        raise PreflightError(
            f"The Hugging Face hub cannot be reached from this machine, so the dataset '{cal.dataset}' cannot be "
            "loaded; upload a JSONL file or use the built-in calibration set.",
            field="calibration",
        )
    return 0


def _check_tasks(evaluation: EvaluationSpec | None) -> None:
    """Unknown lm-eval task names are refused now, not after the whole compression has run."""
    wanted = set(evaluation.tasks) - set(LOCAL_TASKS) if evaluation else set()
    if not wanted:
        return
    from engine.evaluation import _tasks_dir

    unknown = sorted(wanted - _known_tasks(_tasks_dir()))
    if unknown:
        shown = ", ".join(f"'{name[:100]}'" for name in unknown[:5])
        raise PreflightError(
            f"lm-eval has no task named {shown}; the tasks shipped with the service are {', '.join(LOCAL_TASKS)}.",
            field="evaluation",
        )


@functools.cache
def _known_tasks(folder: Path) -> frozenset[str]:
    return known_task_names(folder)
