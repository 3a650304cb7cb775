"""The submission check: what is cheap and certain, whatever the model's size, before a job takes a place in
the queue. It never imports torch, transformers or llm-compressor and never downloads weights, because it
runs in the web process: the request's fields, the recipe without a model, lm-eval task names, a hub
dataset's id, and the model's metadata (config.json, file sizes, the safetensors header), with a hub
model's revision pinned to its commit sha. What needs the weights or the data runs in the worker's first
stage, "preparing" (engine.preflight), and fails the job with the same field-named words.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine import calibration as calib
from engine import hub
from engine.architectures import is_vision_language
from engine.errors import EngineError, PreflightError
from engine.limits import CALIBRATION_MAX_SEQ_LEN, CALIBRATION_SAMPLES, SEARCH_MAX_TRIALS
from engine.lm_tasks import LOCAL_TASKS, known_task_names
from engine.model_sources import ModelFacts, model_facts
from engine.plan import tensor_parallel_problem
from engine.presets import (
    PRESETS,
    Preset,
    check_recipe_text,
    get_preset,
    pattern_matches,
    recipe_ignore,
    recipe_weight_groups,
)
from engine.spec import CalibrationSpec, CompressionSpec, EvaluationSpec, SearchSpec

# The words of the option that leaves such layers unquantized, as the form's checkbox shows them.
IGNORE_INDIVISIBLE_LABEL = "Leave layers a grouped scheme cannot divide unquantized"


@dataclass
class SubmissionCheck:
    """What the submission check learned: the recipe to record (what the worker runs) and the model's facts."""

    model: ModelFacts
    recipe_yaml: str
    extra_ignore: list[str] = field(default_factory=list)
    # None for a custom recipe: only llm-compressor (in the worker) can tell whether it calibrates.
    needs_calibration: bool | None = None
    warnings: list[str] = field(default_factory=list)


def check_submission(spec: CompressionSpec, *, store: Path | None = None) -> SubmissionCheck:
    """Check a job without its weights; raise PreflightError (with .field) when it cannot succeed."""
    try:
        return _check(spec, store)
    except PreflightError:
        raise
    except EngineError as exc:
        raise PreflightError(exc.message, field=exc.field) from None


def _check(spec: CompressionSpec, store: Path | None) -> SubmissionCheck:
    recipe_yaml = base_recipe(spec)
    # What the request's text alone decides comes first: it costs nothing and needs no model.
    if spec.calibration.kind == "hub":
        calib.check_hub_dataset_id(spec.calibration.dataset)
    check_tasks(spec.evaluation)
    check_search(spec)
    model = model_facts(
        spec.model,
        spec.revision,
        allow_pickle=spec.allow_pickle,
        trust_remote_code=spec.trust_remote_code,
        allow_local=spec.allow_local_paths,
        store=store,
    )
    _check_architecture_name(model)
    _check_gpus(spec.gpus, model.config)
    preset = get_preset(spec.preset) if spec.preset else None
    extra_ignore: list[str] = []
    warnings: list[str] = []
    if model.tensors:  # without a header (pickle weights only) the worker checks the shapes
        layers = header_layers(model.linear_widths)
        if preset:
            preset, extra_ignore = fit_preset(preset, layers, spec.ignore_indivisible)
            recipe_yaml = preset.recipe_yaml(extra_ignore)
        else:
            extra_ignore = check_recipe_divides(recipe_yaml, layers)
            warnings = vllm_unquantized_warnings(recipe_yaml, layers)
    needs_calibration = preset.needs_calibration if preset else None
    check_calibration(spec.calibration, needs_calibration)
    return SubmissionCheck(model, recipe_yaml, extra_ignore, needs_calibration, warnings)


def base_recipe(spec: CompressionSpec) -> str:
    """The recipe the request names: a preset's, or the custom text checked without llm-compressor."""
    if spec.preset and spec.recipe_yaml:
        raise PreflightError("Give either a preset or a custom recipe, not both.", field="recipe")
    if spec.preset:
        return get_preset(spec.preset).recipe_yaml()
    if spec.recipe_yaml:
        return check_recipe_text(spec.recipe_yaml)
    raise PreflightError("Choose a preset or give a custom recipe.", field="preset")


def not_a_causal_lm(name: str, config: dict) -> PreflightError:
    return PreflightError(
        f"'{name}' is not a causal language model this service supports, nor a vision-language model "
        f"(model_type={config.get('model_type')!r}, architectures={config.get('architectures') or []}).",
        field="model",
    )


def _check_architecture_name(model: ModelFacts) -> None:
    """By the class names transformers uses for causal LMs, and for vision-language models (a vision tower in the
    config, a ...ForConditionalGeneration class); the worker checks against transformers itself."""
    architectures = model.config.get("architectures") or []
    endings = (
        "ForCausalLM",
        "LMHeadModel",
        *(("ForConditionalGeneration",) if is_vision_language(model.config) else ()),
    )
    if not model.config.get("model_type") or not any(a.endswith(endings) for a in architectures):
        raise not_a_causal_lm(model.name, model.config)


def _check_gpus(gpus: int | None, config: dict) -> None:
    """A GPU count that vLLM's tensor parallelism cannot use for this model is refused before it queues."""
    if gpus is None:
        return
    heads = config.get("num_attention_heads") or (config.get("text_config") or {}).get("num_attention_heads") or 0
    problem = tensor_parallel_problem(int(heads), gpus)
    if problem:
        raise PreflightError(problem, field="gpus")


# A layer a Linear target may cover: its name -> (input width, its class names). The header knows no classes:
# its 2-D weights are Linear layers (header_layers); the worker's modules have their own (engine.preflight).
Layers = dict[str, tuple[int, tuple[str, ...]]]

# Linear layers vLLM builds without the checkpoint's quantization (and whose scales its loader then refuses): MoE
# routers, Qwen MoE's shared-expert gate, vision towers and their projectors. llm-compressor's own examples leave
# them out by these patterns (examples/quantizing_moe, examples/multimodal_vision: Qwen2-VL's and Qwen2.5-VL's
# "visual", Idefics3's "vision_model" and "connector", Llava's and Gemma 3's "vision_tower" and
# "multi_modal_projector"; quantization_w8a8_fp8/qwen3_5_moe); the presets leave out those the model has.
VLLM_UNQUANTIZED = (
    "re:.*mlp.gate$",
    "re:.*block_sparse_moe.gate$",
    "re:.*shared_expert_gate$",
    "re:.*visual.*",
    "re:.*vision_tower.*",
    "re:.*multi_modal_projector.*",
    "re:model.vision_model.*",
    "re:model.connector.*",
)


def header_layers(widths: dict[str, int]) -> Layers:
    return {name: (width, ("Linear",)) for name, width in widths.items()}


def matches(name: str, classes: tuple[str, ...], patterns: tuple[str, ...]) -> bool:
    """compressed-tensors' rule (compressed_tensors.utils.match.is_match): an exact module name, a 're:' regular
    expression found at the start of the name (matched by RE2, in linear time: engine.presets.pattern_matches),
    or the name of one of the module's classes."""
    return any(pattern_matches(pattern, name) or pattern in classes for pattern in patterns)


def unquantized_by_vllm(layers: Layers) -> list[str]:
    """The VLLM_UNQUANTIZED patterns that match a layer of this model (what its presets' recipes ignore)."""
    return [p for p in VLLM_UNQUANTIZED if any(matches(name, classes, (p,)) for name, (_w, classes) in layers.items())]


def quantized_layers(recipe_yaml: str, layers: Layers) -> dict[str, set[int]]:
    """The layers the recipe quantizes, each with the group sizes it is quantized in (empty: ungrouped).

    Each distinct target or ignore entry is matched against the layers once: a recipe of 64 KB may repeat a
    long list in a thousand groups, and matching each group's lists layer by layer took 30 s of web CPU."""
    by_class: dict[str, set[str]] = {}
    for name, (_width, classes) in layers.items():
        for cls in classes:
            by_class.setdefault(cls, set()).add(name)
    hits: dict[str, set[str]] = {}

    def covered(entries: tuple[str, ...]) -> set[str]:
        for entry in entries:
            if entry not in hits:
                # matches()'s rule, one entry against every layer: an exact name or a class by lookup
                hits[entry] = (
                    {name for name in layers if pattern_matches(entry, name)}
                    if entry.startswith("re:")
                    else ({entry} & layers.keys()) | by_class.get(entry, set())
                )
        return set().union(*(hits[entry] for entry in entries))

    found: dict[str, set[int]] = {}
    for group in recipe_weight_groups(recipe_yaml):
        chosen = covered(group.targets) - covered(group.ignore)
        for name in layers:  # in the model's order
            if name in chosen:
                found.setdefault(name, set()).update([group.group_size] if group.group_size else [])
    return found


def fit_preset(preset: Preset, layers: Layers, ignore_indivisible: bool) -> tuple[Preset, list[str]]:
    """The preset for this model, and the layers its recipe adds to `ignore`.

    The layers vLLM keeps unquantized are left out; a grouped preset takes the largest of its group sizes that
    divides the input width of every layer it then quantizes. Where none does, the layers the preset's own
    size cannot divide are refused by name, or left out too (ignore_indivisible), in the size that leaves out
    the fewest.
    """
    ignore = unquantized_by_vllm(layers)
    quantized = quantized_layers(preset.recipe_yaml(ignore), layers)
    if not quantized:
        raise nothing_to_quantize(preset.name, layers, ignore, field="preset")
    if not preset.group_size:
        return preset, ignore
    widths = {name: layers[name][0] for name in quantized}
    sizes = preset.group_sizes or (preset.group_size,)
    indivisible = {size: [name for name, width in widths.items() if width % size] for size in sizes}
    size = min(sizes, key=lambda size: len(indivisible[size]))  # the first (largest) of the fewest
    if not indivisible[size]:
        return preset.with_group_size(size), ignore
    if not ignore_indivisible:
        size = preset.group_size  # named by the preset's own size; the others are said to fail too
    left_out = check_group_sizes(widths, {size}, ignore_indivisible, also_tried=tuple(s for s in sizes if s != size))
    return preset.with_group_size(size), ignore + left_out


def vllm_unquantized_warnings(recipe_yaml: str, layers: Layers) -> list[str]:
    """A custom recipe that quantizes layers vLLM keeps unquantized runs (it is the user's), with a warning: vLLM
    will refuse its checkpoint. Not a refusal: from the header alone a router is a Linear layer, which in the
    loaded model it may not be (transformers' routers are often modules of their own, no Linear target)."""
    quantized = quantized_layers(recipe_yaml, layers)
    kept = [p for p in VLLM_UNQUANTIZED if any(matches(name, layers[name][1], (p,)) for name in quantized)]
    if not kept:
        return []
    return [
        f"The recipe quantizes layers vLLM keeps unquantized ({', '.join(kept)}): vLLM refuses such a checkpoint. "
        "llm-compressor's examples put them in the recipe's ignore list."
    ]


def nothing_to_quantize(name: str, layers: Layers, ignore: list[str], *, field: str) -> PreflightError:
    kept = f" once {', '.join(ignore)} are left out as vLLM keeps them unquantized" if ignore else ""
    return PreflightError(
        f"{name} would quantize nothing in this model: its targets match none of its {len(layers)} Linear "
        f"layers{kept}. This model cannot be compressed by it.",
        field=field,
    )


def check_group_sizes(
    widths: dict[str, int], group_sizes: set[int], ignore_indivisible: bool, *, also_tried: tuple[int, ...] = ()
) -> list[str]:
    """Grouped schemes need each quantized layer's input columns divisible by the group size.

    widths: layer name -> input width, of the layers the scheme quantizes. Returns the layers to leave
    unquantized (ignore_indivisible), or raises naming them, in the words of a preset (whose recipe the service
    writes: the form's checkbox adds them to its ignore list).
    """
    widths = {name: width for name, width in widths.items() if not name.endswith("lm_head")}
    bad = _indivisible(widths, group_sizes)
    if not bad:
        return []
    if ignore_indivisible:
        return _compact_ignore(widths, bad)
    others = f" Groups of {_listed(list(also_tried))} do not fit every layer either." if also_tried else ""
    raise PreflightError(
        f"{_indivisible_words(sorted(group_sizes, reverse=True), widths, bad)}{others} Choose another preset, or "
        "leave these layers unquantized: tick "
        f"“{IGNORE_INDIVISIBLE_LABEL}” on the form (ignore_indivisible in the API, --ignore-indivisible "
        "on the command line).",
        field="preset",
    )


def check_recipe_divides(recipe_yaml: str, layers: Layers) -> list[str]:
    """A custom recipe's group sizes against the input widths of the layers it quantizes (its own targets and
    ignore, matched as compressed-tensors matches them), from the header or the worker's modules.

    Returns what the recipe leaves unquantized besides lm_head. A recipe that quantizes nothing, or a layer its
    group size cannot divide, is refused with what to write in the recipe: the service never rewrites a custom
    recipe, so the preset route's checkbox is not offered here.
    """
    quantized = quantized_layers(recipe_yaml, layers)
    if not quantized:
        raise nothing_to_quantize("The recipe", layers, [], field="recipe")
    widths = {name: layers[name][0] for name in quantized if not name.endswith("lm_head")}
    sizes = {size for name in widths for size in quantized[name]}
    bad = sorted({name for name in widths for size in quantized[name] if widths[name] % size})
    if bad:
        fits = [size for size in (128, 64, 32) if size < max(sizes) and not _indivisible(widths, {size})]
        other = f", or give its weights groups of {fits[0]}, which divide every layer it quantizes" if fits else ""
        patterns = ", ".join(f"'{pattern}'" for pattern in _compact_ignore(widths, bad))
        raise PreflightError(
            f"{_indivisible_words(sorted(sizes, reverse=True), widths, bad)} Add them to the recipe's ignore list "
            f"({patterns}){other}.",
            field="recipe",
        )
    return sorted(recipe_ignore(recipe_yaml) - {"lm_head"})


def _indivisible(widths: dict[str, int], group_sizes: set[int]) -> list[str]:
    return sorted(name for name, width in widths.items() if any(width % size for size in group_sizes))


def _indivisible_words(sizes: list[int], widths: dict[str, int], bad: list[str]) -> str:
    shown = ", ".join(sorted({re.sub(r"\.\d+\.", ".*.", name) for name in bad}))
    shown_widths = ", ".join(str(width) for width in sorted({widths[name] for name in bad}))
    named = f"Group size {sizes[0]} does not" if len(sizes) == 1 else f"Group sizes {_listed(sizes)} do not"
    return f"{named} divide the input width ({shown_widths}) of {len(bad)} layers: {shown}."


def _listed(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes[:-1])) + f" and {sizes[-1]}" if len(sizes) > 1 else str(sizes[0])


def _compact_ignore(widths: dict[str, int], bad: list[str]) -> list[str]:
    """Collapse per-layer names into llm-compressor 're:' patterns where a pattern matches only bad layers."""
    bad_set, compact = set(bad), []
    for pattern in sorted({_layer_pattern(name) for name in bad}):
        covered = {n for n in widths if re.fullmatch(pattern, n)}
        compact.extend([f"re:^{pattern}$"] if covered <= bad_set else sorted(covered & bad_set))
    return compact


def _layer_pattern(name: str) -> str:
    """model.layers.3.mlp.up_proj -> model\\.layers\\.\\d+\\.mlp\\.up_proj (numbered parts become \\d+)."""
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))


def check_calibration(cal: CalibrationSpec, needs_calibration: bool | None, *, load_hub: bool = False) -> list[dict]:
    """Refuse calibration settings that cannot work; return the rows read (a hub set, and an upload whose rows
    were counted, only with load_hub: the worker's call).

    needs_calibration None (a custom recipe not yet judged by llm-compressor): "none" is left to the worker.
    """
    if needs_calibration is False or (needs_calibration is None and cal.kind == "none"):
        return []
    if cal.kind == "none":
        raise PreflightError(
            "This recipe needs calibration data (its scales or Hessians come from sample activations); "
            "choose the built-in set, upload a JSONL file or name a hub dataset.",
            field="calibration",
        )
    if cal.samples < CALIBRATION_SAMPLES.least or cal.max_seq_len < CALIBRATION_MAX_SEQ_LEN.least:
        raise PreflightError(
            f"Use at least {CALIBRATION_SAMPLES.least} sample of at least {CALIBRATION_MAX_SEQ_LEN.least} tokens.",
            field="calibration",
        )
    if cal.kind == "hub" and not load_hub:
        hub.check_dataset(cal.dataset)  # metadata only: the web process never reads a dataset (nor its cache)
        return []
    if cal.kind == "jsonl" and cal.rows is not None and not load_hub:
        records, usable = [], cal.rows  # counted when it was uploaded: a submission never reads the file again
    else:
        records = calib.load_records(cal)
        usable = len(records)
    if usable < cal.samples:
        raise PreflightError(
            f"The calibration data has {usable} usable rows but {cal.samples} samples were requested.",
            field="calibration",
        )
    return records


def check_tasks(evaluation: EvaluationSpec | None) -> None:
    """Unknown lm-eval task names are refused now, not after the whole compression has run."""
    wanted = set(evaluation.tasks) - set(LOCAL_TASKS) if evaluation else set()
    if not wanted:
        return
    from engine.lm_tasks import tasks_dir

    unknown = sorted(wanted - _known_tasks(tasks_dir()))
    if unknown:
        shown = ", ".join(f"'{name[:100]}'" for name in unknown[:5])
        raise PreflightError(
            f"lm-eval has no task named {shown}; the tasks shipped with the service are {', '.join(LOCAL_TASKS)}.",
            field="evaluation",
        )


@functools.cache
def _known_tasks(folder: Path) -> frozenset[str]:
    return known_task_names(folder)


# --- floor search and sweep (engine.search) -------------------------------------------------------------

# What a floor may be stated on: the offline suite's perplexity recovery (the figure every job reports), or
# the average recovery of the job's lm-eval tasks (each trial's accuracy over the baseline's, same items).
PERPLEXITY_FLOOR, TASK_FLOOR = "perplexity_recovery", "task_recovery"
FLOOR_METRICS = {
    PERPLEXITY_FLOOR: "perplexity recovery on the held-out text",
    TASK_FLOOR: "average recovery of the evaluation's lm-eval tasks",
}
MAX_SWEEP_PRESETS = len(PRESETS)


def check_search(spec: CompressionSpec) -> None:
    """The submission check's part for a floor search or a sweep (engine.search runs them): known floor metric
    and presets, a sane budget."""
    search = spec.search
    if search is None:
        return
    if not spec.preset:
        raise PreflightError("A floor search or a sweep starts from a preset, not a custom recipe.", field="search")
    if search.floor is not None:
        if search.floor.metric not in FLOOR_METRICS:
            known = ", ".join(FLOOR_METRICS)
            raise PreflightError(f"Unknown floor metric '{search.floor.metric}'; use {known}.", field="search")
        if not 0 < search.floor.at_least <= 1:
            raise PreflightError(
                "The floor's at_least is a fraction of the baseline: above 0, at most 1.", field="search"
            )
        if search.floor.metric == TASK_FLOOR:
            _check_task_floor(spec.evaluation)
    budget = search.budget
    if not SEARCH_MAX_TRIALS.least <= budget.max_trials <= SEARCH_MAX_TRIALS.most:
        raise PreflightError(
            f"max_trials must be between {SEARCH_MAX_TRIALS.least} and {SEARCH_MAX_TRIALS.most}.", field="search"
        )
    if budget.max_seconds is not None and budget.max_seconds <= 0:
        raise PreflightError("max_seconds must be positive.", field="search")
    if budget.max_size_ratio is not None and not 0 < budget.max_size_ratio <= 1:
        raise PreflightError("max_size_ratio is a fraction of the original size: above 0, at most 1.", field="search")
    for name in search.presets:
        get_preset(name)
    if len(set(search.presets)) > MAX_SWEEP_PRESETS:
        raise PreflightError(f"A sweep tries at most {MAX_SWEEP_PRESETS} presets.", field="search")
    if spec.calibration.kind == "none" and any(PRESETS[p].needs_calibration for p in sweep_presets(spec)):
        raise PreflightError("A preset of the sweep needs calibration data; choose some.", field="calibration")


def _check_task_floor(evaluation: EvaluationSpec | None) -> None:
    """A task floor judges every trial on the evaluation's tasks, in memory: tasks, run by the hf backend."""
    if evaluation is None or not evaluation.tasks:
        raise PreflightError(
            "A task floor needs the lm-eval tasks it is judged on: set evaluation.tasks.", field="search"
        )
    if evaluation.backend != "hf":
        raise PreflightError(
            "A task floor scores each trial in memory with the hf backend; set evaluation.backend to hf "
            "(the chosen checkpoint's own evaluation runs on hf too).",
            field="search",
        )


def sweep_presets(spec: CompressionSpec) -> list[str]:
    """The presets a search tries first: the job's preset, then the sweep's others, each once."""
    search = spec.search or SearchSpec()
    return list(dict.fromkeys([p for p in (spec.preset, *search.presets) if p]))
