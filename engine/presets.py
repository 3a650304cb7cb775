"""Presets: named, described llm-compressor recipes (three of them reproduce the seed model cards).

Every recipe is built as YAML text, so a preset and a custom recipe travel the same way: validated here,
handed to oneshot, and written beside the checkpoint as recipe.yaml.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib.metadata
import itertools
import json
import math
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import re2
import yaml

from engine.errors import EngineError

_IGNORE_DEFAULT = ("lm_head",)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    needs_calibration: bool
    modifiers: tuple[tuple[str, dict[str, Any]], ...]
    # Plain-words facts for the model card's "Model Optimizations" section.
    weight_quantization: str | None = None
    activation_quantization: str | None = None
    sparsity: str | None = None
    method: str = ""
    seed_card: str | None = None
    group_size: int | None = None
    # The group sizes the preset may take, largest first: the first that divides the input width of every layer
    # it quantizes is the model's (submission.fit_preset). One size for the whole recipe, which one config
    # group expresses; empty when the format fixes it (NVFP4's 16).
    group_sizes: tuple[int, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    def needs(self) -> list[str]:
        """What a job with this preset needs, in words (the form and the API say the same)."""
        needs = ["calibration data" if self.needs_calibration else "no calibration data (data-free)"]
        if len(self.group_sizes) > 1:
            smaller = " or ".join(str(size) for size in self.group_sizes[1:])
            needs.append(
                f"layer input widths divisible by {self.group_size} (else groups of {smaller}, the largest that "
                "divides every layer it quantizes)"
            )
        elif self.group_size:
            needs.append(f"layer input widths divisible by {self.group_size}")
        return needs

    def with_group_size(self, size: int) -> Preset:
        """The preset with its weights in groups of `size` (one of group_sizes), said in its own words; its
        named scheme becomes the one config group that says so."""
        # The form's words name every size the preset may take; the fitted preset's name the one it runs in.
        description = self.description
        if self.group_sizes:
            description = description.replace(_groups_words(self.group_sizes), f"groups of {size}")
        if size == self.group_size:
            return dataclasses.replace(self, description=description)
        if size not in self.group_sizes:
            raise EngineError(f"{self.name} takes groups of {', '.join(map(str, self.group_sizes))}.", field="preset")
        modifiers = tuple((name, _regrouped(args, size)) for name, args in self.modifiers)
        old, new = f"of {self.group_size}", f"of {size}"
        return dataclasses.replace(
            self,
            modifiers=modifiers,
            group_size=size,
            description=description,
            weight_quantization=self.weight_quantization and self.weight_quantization.replace(old, new),
            notes=(
                *self.notes,
                f"Groups of {size} on this model: {self.group_size} does not divide the input width of every "
                "layer it quantizes.",
            ),
        )

    def summary(self) -> dict[str, Any]:
        """The preset as plain data, the one description the form, the pages and the API show."""
        return {
            "name": self.name,
            "description": self.description,
            "needs": self.needs(),
            "needs_calibration": self.needs_calibration,
            "weight_quantization": self.weight_quantization,
            "activation_quantization": self.activation_quantization,
            "sparsity": self.sparsity,
            "method": self.method,
            "group_size": self.group_size,
            "seed_card": self.seed_card,
            "notes": list(self.notes),
        }

    def recipe_yaml(self, extra_ignore: list[str] | None = None) -> str:
        """The llm-compressor recipe for this preset, with extra layers left unquantized."""
        ignore = tuple(_IGNORE_DEFAULT) + tuple(sorted(set(extra_ignore or []) - set(_IGNORE_DEFAULT)))
        # Every submission asks for its preset's recipe: dumped once per (modifiers, ignore). The modifiers'
        # repr is exact for the plain data they hold, and tells apart a search's variants of the same name.
        key = (repr(self.modifiers), ignore)
        if key not in _DUMPED_RECIPES:
            if len(_DUMPED_RECIPES) >= _MAX_DUMPED_RECIPES:
                _DUMPED_RECIPES.clear()
            # A list of its own per modifier: a shared one would be dumped as a YAML alias, which recipes may
            # not have.
            stage = {name: {**args, "ignore": list(ignore)} for name, args in self.modifiers}
            _DUMPED_RECIPES[key] = yaml.safe_dump(
                {"compression_stage": {"compression_modifiers": stage}}, sort_keys=False
            )
        return _DUMPED_RECIPES[key]


_DUMPED_RECIPES: dict[tuple[str, tuple[str, ...]], str] = {}
_MAX_DUMPED_RECIPES = 512


def _groups_words(sizes: tuple[int, ...]) -> str:
    """A grouped preset's group size in its description before a model is chosen: "groups of 128 (64 or 32
    where 128 does not divide every layer)", never a fixed 128 that the model's widths may not allow."""
    if len(sizes) == 1:
        return f"groups of {sizes[0]}"
    smaller = " or ".join(str(size) for size in sizes[1:])
    return f"groups of {sizes[0]} ({smaller} where {sizes[0]} does not divide every layer)"


def _quant(scheme: str) -> dict[str, Any]:
    return {"targets": ["Linear"], "scheme": scheme}


# compressed-tensors' integer weight-only schemes, as their one config group would write them but for the size.
_GROUPED_INT_BITS = {"W4A16": 4, "W8A16": 8}
# The group sizes of the integer grouped presets, largest first (submission.fit_preset takes the first that fits).
_FITTED_GROUP_SIZES = (128, 64, 32)


def _regrouped(args: dict[str, Any], size: int) -> dict[str, Any]:
    """A modifier's arguments with its named grouped scheme ("W4A16") written out in groups of `size`."""
    scheme = args.get("scheme")
    bits = _GROUPED_INT_BITS.get(scheme) if isinstance(scheme, str) else None
    if bits is None:
        return args
    targets = list(args.get("targets") or ["Linear"])
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": size}
    group = {"targets": targets, "weights": {**weights, "dynamic": False}}
    return {**{k: v for k, v in args.items() if k != "scheme"}, "config_groups": {"group_0": group}}


_MSE_FP8_DYNAMIC = {
    "targets": ["Linear"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 8,
                "type": "float",
                "strategy": "channel",
                "symmetric": True,
                "dynamic": False,
                "observer": "mse",
            },
            "input_activations": {
                "num_bits": 8,
                "type": "float",
                "strategy": "token",
                "symmetric": True,
                "dynamic": True,
            },
        }
    },
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="fp8-static",
            description="FP8 weights and activations with static per-tensor scales, calibrated (seed 002).",
            needs_calibration=True,
            modifiers=(("QuantizationModifier", _quant("FP8")),),
            weight_quantization="FP8, symmetric static per-tensor scale",
            activation_quantization="FP8, symmetric static per-tensor scale calibrated on sample data",
            method="round-to-nearest with min-max observers",
            seed_card="002 (Meta-Llama-3.1-405B-FP8)",
        ),
        Preset(
            name="fp8-dynamic",
            description="FP8 per-channel weights and dynamic per-token activations; needs no calibration data.",
            needs_calibration=False,
            modifiers=(("QuantizationModifier", _quant("FP8_DYNAMIC")),),
            weight_quantization="FP8, symmetric static per-channel scales",
            activation_quantization="FP8, symmetric dynamic per-token scales computed at run time",
            method="round-to-nearest, data-free",
        ),
        Preset(
            name="sparse24-fp8-dynamic",
            description=(
                "SparseGPT 2:4 sparsity then FP8 dynamic (seed 003); saved dense, current vLLM does not speed up 2:4."
            ),
            needs_calibration=True,
            modifiers=(
                ("SparseGPTModifier", {"sparsity": 0.5, "mask_structure": "2:4", "targets": ["Linear"]}),
                ("QuantizationModifier", _MSE_FP8_DYNAMIC),
            ),
            weight_quantization="FP8, symmetric static per-channel scales chosen by minimizing the MSE",
            activation_quantization="FP8, symmetric dynamic per-token scales computed at run time",
            sparsity="2:4 semi-structured (SparseGPT), 50 % of the weights are zero",
            method="SparseGPT pruning, then round-to-nearest FP8",
            seed_card="003 (Sparse-Llama-3.1-8B-gsm8k-2of4-FP8-dynamic)",
            notes=(
                "The 2:4 checkpoint is saved dense (half of the weights are zeros); current vLLM "
                "loads it but no longer accelerates 2:4 sparsity.",
            ),
        ),
        Preset(
            name="int8-w8a8-gptq",
            description="GPTQ int8 per-channel weights, dynamic per-token int8 activations, 1 % dampening (seed 004).",
            needs_calibration=True,
            modifiers=(("GPTQModifier", {**_quant("W8A8"), "dampening_frac": 0.01}),),
            weight_quantization="INT8, symmetric static per-channel scales",
            activation_quantization="INT8, symmetric dynamic per-token scales computed at run time",
            method="GPTQ with a 1 % dampening factor",
            seed_card="004 (gemma-2-2b-it-quantized.w8a8)",
        ),
        Preset(
            name="w4a16-gptq",
            description=f"GPTQ int4 weights in {_groups_words(_FITTED_GROUP_SIZES)}, activations kept in 16 bits.",
            needs_calibration=True,
            modifiers=(("GPTQModifier", {**_quant("W4A16"), "dampening_frac": 0.01}),),
            weight_quantization="INT4, symmetric static scales per group of 128 columns",
            activation_quantization=None,
            method="GPTQ with a 1 % dampening factor",
            group_size=128,
            group_sizes=_FITTED_GROUP_SIZES,
        ),
        Preset(
            name="w8a16-gptq",
            description=f"GPTQ int8 weights in {_groups_words(_FITTED_GROUP_SIZES)}, activations kept in 16 bits.",
            needs_calibration=True,
            modifiers=(("GPTQModifier", {**_quant("W8A16"), "dampening_frac": 0.01}),),
            weight_quantization="INT8, symmetric static scales per group of 128 columns",
            activation_quantization=None,
            method="GPTQ with a 1 % dampening factor",
            group_size=128,
            group_sizes=_FITTED_GROUP_SIZES,
        ),
        Preset(
            name="smoothquant-int8-w8a8",
            description="SmoothQuant (strength 0.8) then GPTQ int8 weights and dynamic int8 activations.",
            needs_calibration=True,
            modifiers=(
                ("SmoothQuantModifier", {"smoothing_strength": 0.8}),
                ("GPTQModifier", {**_quant("W8A8"), "dampening_frac": 0.01}),
            ),
            weight_quantization="INT8, symmetric static per-channel scales",
            activation_quantization="INT8, symmetric dynamic per-token scales computed at run time",
            method="SmoothQuant migrates activation outliers into the weights, then GPTQ",
        ),
        Preset(
            name="nvfp4",
            description="NVFP4 weights and activations in groups of 16 (Blackwell GPUs), calibrated.",
            needs_calibration=True,
            modifiers=(("QuantizationModifier", _quant("NVFP4")),),
            weight_quantization="FP4 (E2M1), scales per group of 16 with a global FP32 scale",
            activation_quantization="FP4 (E2M1), dynamic scales per group of 16 with a calibrated global scale",
            method="round-to-nearest",
            group_size=16,
        ),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(PRESETS)
        raise EngineError(f"Unknown preset '{name}'. Known presets: {known}.", field="preset") from None


def preset_for_recipe(name: str | None, recipe_yaml: str) -> Preset | None:
    """The preset as the job's recorded recipe ran it: in the group size chosen for its model at submission
    (the pages and the card say "groups of 64" where 64 was chosen). None for a custom recipe."""
    preset = PRESETS.get(name or "")
    if preset is None or not preset.group_sizes or not recipe_yaml:
        return preset
    sizes = recipe_group_sizes(recipe_yaml) & set(preset.group_sizes)
    return preset.with_group_size(max(sizes)) if sizes else preset


MAX_RECIPE_BYTES = 64 * 1024
# Real recipes have a handful of modifiers a few levels deep; these bounds keep validation under a second.
MAX_RECIPE_MODIFIERS = 32
_MAX_RECIPE_DEPTH = 32
# llm-compressor evaluates a pruning scheduler written as "calc(...)" with Python's eval: a recipe is data.
_CODE_IN_STRING = re.compile(r"calc\s*\(|__\w+__|\blambda\b")


# libyaml's parser and composer (C) where PyYAML has them, with PyYAML's safe constructors (no Python object tags):
# a recipe of 64 KB takes a tenth of the pure-Python parser's CPU.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _refuse_aliases_and_depth(text: str) -> None:
    """Read the recipe's events (no values built yet): refuse aliases and nesting deeper than _MAX_RECIPE_DEPTH.

    Nested aliases multiply a small document into billions of nodes (the "billion laughs"); a recipe never needs
    them, so the first alias stops the parse before anything is built. Nesting is capped before the composer's
    recursion could run out of stack.
    """
    depth = 0
    for event in yaml.parse(text, Loader=_SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a recipe; write the values out", event.start_mark
            )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > _MAX_RECIPE_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"the recipe is nested more than {_MAX_RECIPE_DEPTH} levels deep", event.start_mark
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def load_recipe_yaml(text: str) -> Any:
    """Parse recipe text: at most MAX_RECIPE_BYTES, no aliases, no Python object tags."""
    if len(text.encode("utf-8", errors="replace")) > MAX_RECIPE_BYTES:
        raise EngineError(f"The recipe is larger than {MAX_RECIPE_BYTES // 1024} KB.", field="recipe")
    # Each submission parses its recipe several times (checks, routing): parsed once, a copy each time.
    return copy.deepcopy(_parsed_recipe(text))


def _yaml_error_text(exc: yaml.YAMLError) -> str:
    """PyYAML's error as one sentence with the line and column a person counts (from 1), without its
    '<unicode string>' lines or caret snippets: "... at line 2, column 2: did not find expected ',' or ']'
    (while parsing a flow sequence from line 1, column 4)."."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or not problem:
        return "The recipe is not valid YAML: " + " ".join(str(exc).split()) + "."
    text = f"The recipe is not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, where = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and where is not None and (where.line, where.column) != (mark.line, mark.column):
        text += f" ({context} from line {where.line + 1}, column {where.column + 1})"
    elif context:
        text += f" ({context})"
    return text + "."


@functools.lru_cache(maxsize=256)
def _parsed_recipe(text: str) -> Any:
    try:
        _refuse_aliases_and_depth(text)
        data = yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - PyYAML's safe loader, in C where it can
    except yaml.YAMLError as exc:
        raise EngineError(_yaml_error_text(exc), field="recipe") from None
    except (ValueError, OverflowError):
        # PyYAML's own constructors: an integer of thousands of digits (Python's int limit), a sexagesimal
        # float like 1:59:59:... too large for a float, an impossible date.
        raise EngineError(
            "The recipe holds a value YAML cannot read as a number or a date (a number of thousands of digits, "
            "say); numbers in a recipe are short.",
            field="recipe",
        ) from None
    _check_plain_data(data)
    return data


# Larger numbers mean nothing to a recipe (counts, fractions, sizes), and turning a huge one into text fails.
_MAX_RECIPE_INT = 10**18


def _check_plain_data(node: Any, where: str = "") -> None:
    """A recipe holds what JSON holds: text keys, strings, finite numbers, booleans, null, lists and mappings.

    The safe loader also builds bytes (!!binary), sets (!!set), pairs (!!omap) and dates, which no modifier
    argument takes, and keys that are not text, which the checks below could not name.
    """
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                raise EngineError(
                    f"The recipe's keys are names; {where or 'its top level'} has the key {str(key)[:100]!r}.",
                    field="recipe",
                )
            _check_plain_data(value, f"{where}.{key}" if where else key)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            _check_plain_data(item, f"{where}[{index}]")
    elif isinstance(node, bool) or node is None or isinstance(node, str):
        return
    elif isinstance(node, int):
        if abs(node) > _MAX_RECIPE_INT:
            raise EngineError(f"The recipe's '{where[:200]}' is a number of more than 18 digits.", field="recipe")
    elif isinstance(node, float):
        if not math.isfinite(node):
            raise EngineError(f"The recipe's '{where[:200]}' is {node}; a recipe's numbers are finite.", field="recipe")
    else:
        kind = {bytes: "binary data (!!binary)", set: "a set (!!set)", tuple: "pairs (!!omap or !!pairs)"}
        shown = kind.get(type(node), f"a {type(node).__name__} (a date?)")
        raise EngineError(
            f"The recipe's '{where[:200] or 'value'}' is {shown}; a recipe holds only strings, numbers, booleans, "
            "lists and mappings.",
            field="recipe",
        )


def check_recipe_text(text: str) -> str:
    """What a custom recipe's text alone decides, without llm-compressor (no torch): return it unchanged.

    Safe YAML, a mapping with at most MAX_RECIPE_MODIFIERS modifiers and no code in it. Whether
    llm-compressor accepts its modifiers and arguments is validate_recipe_yaml's part, in the worker.
    """
    data = load_recipe_yaml(text)
    if not isinstance(data, dict) or not data:
        raise EngineError("The recipe must be a YAML mapping of stages to modifiers.", field="recipe")
    _refuse_code(data)
    if len(_modifier_args(data)) > MAX_RECIPE_MODIFIERS:
        raise EngineError(f"The recipe has more than {MAX_RECIPE_MODIFIERS} modifiers.", field="recipe")
    _check_modifiers(data)
    return text


def _check_modifiers(data: dict) -> None:
    """The recipe names at least one modifier, each one llm-compressor has, given only arguments it takes, each
    of a type its pydantic model admits (read from llm-compressor by library_facts), named schemes it knows,
    and 're:' patterns RE2 compiles. llm-compressor's own models need torch: the worker runs them too."""
    found = 0
    facts = library_facts()
    for stage_key, stage in data.items():
        groups = stage.items() if stage_key.endswith("_stage") and isinstance(stage, dict) else ()
        for group_key, group in groups:
            modifiers = group.items() if group_key.endswith("_modifiers") and isinstance(group, dict) else ()
            for name, args in modifiers:
                found += 1
                if facts is not None:  # else llm-compressor is not installed here: the worker judges it all
                    _check_modifier(name, args, facts)
    if not found:
        raise EngineError(
            "The recipe names no modifier; llm-compressor reads the layout "
            "'NAME_stage: GROUP_modifiers: ModifierName: {arguments}'.",
            field="recipe",
        )
    _check_patterns(data)


def _check_modifier(name: str, args: Any, facts: dict[str, Any]) -> None:
    known = facts["modifiers"]
    if name not in known:
        raise EngineError(
            f"llm-compressor has no modifier '{name[:100]}'; it has {', '.join(sorted(known))}.", field="recipe"
        )
    if args is None:
        return  # every argument left at its default
    if not isinstance(args, dict):
        raise EngineError(f"{name}'s arguments are a mapping of names to values, not {_shown(args)}.", field="recipe")
    allowed = known[name]
    unknown = sorted(set(args) - set(allowed)) if allowed is not None else []
    if unknown:
        raise EngineError(
            f"llm-compressor's {name} takes no argument {', '.join(repr(a[:100]) for a in unknown)}; "
            f"it takes {', '.join(allowed)}.",
            field="recipe",
        )
    kinds = facts["arguments"].get(name, {})
    for arg, value in args.items():
        expected = kinds.get(arg)
        if expected is not None and not _value_kinds(value) & set(expected):
            # A whole number is a number too; null is said last.
            said = [k for k in expected if k != "null" and not (k == "integer" and "number" in expected)]
            words = " or ".join(_KIND_WORDS.get(k, f"'{k[1:]}'") for k in said + ["null"] * ("null" in expected))
            raise EngineError(f"{name}'s {arg} is {words}, not {_shown(value)}.", field="recipe")
    if "scheme" in args:
        _check_scheme(name, args["scheme"], facts["scheme_group_sizes"])


_KIND_WORDS = {
    "null": "null",
    "boolean": "true or false",
    "integer": "a whole number",
    "number": "a number",
    "string": "a string",
    "mapping": "a mapping",
    "list": "a list",
    "list of strings": "a list of strings",
    "list of numbers": "a list of numbers",
    "list of lists": "a list of lists",
    "list of mappings": "a list of mappings",
}


def _value_kinds(value: Any) -> set[str]:
    """The kinds (as library_facts' child names them) a parsed YAML value is."""
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number"}
    if isinstance(value, str):
        return {"string", f"={value}"}
    if isinstance(value, dict):
        return {"mapping"}
    items = [_value_kinds(item) for item in value]
    return {"list"} | {f"list of {kind}s" for kind in _LISTED if all(kind in item for item in items)}


_LISTED = ("string", "number", "list", "mapping")


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 100 else text[:100] + "..."


def _check_scheme(name: str, scheme: Any, schemes: dict[str, Any]) -> None:
    """llm-compressor's rule (QuantizationMixin.validate_scheme): a compressed-tensors preset scheme name, or a
    mapping of such names to the targets each covers."""
    given = [scheme] if isinstance(scheme, str) else list(scheme) if isinstance(scheme, dict) else []
    for scheme_name in given:
        if scheme_name.upper() not in schemes:
            raise EngineError(
                f"{name}'s scheme '{scheme_name[:100]}' is not a compressed-tensors preset scheme; "
                f"use one of {', '.join(sorted(schemes))}, or config_groups.",
                field="recipe",
            )
    if isinstance(scheme, dict):
        for scheme_name, targets in scheme.items():
            if not _value_kinds(targets) & {"string", "list of strings"}:
                raise EngineError(
                    f"{name}'s scheme {scheme_name} covers a target name or a list of them, not {_shown(targets)}.",
                    field="recipe",
                )


# --- 're:' patterns -------------------------------------------------------------------------------------------
# compressed-tensors reads a target or an ignore entry that starts with 're:' as a regular expression, which it
# matches at the start of each module's name with Python's re (compressed_tensors.utils.match.match_name). That
# engine backtracks: 're:(a+)+$' or 're:(.*a){25}' against 32-character names runs for hours. A recipe's patterns
# are matched by RE2 instead, in time linear in the name: the web process refuses what RE2 cannot compile
# (backreferences, lookarounds), and the worker hands llm-compressor only names, or patterns that cannot
# backtrack, that RE2 matched (linear_time_recipe).

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is the user's error, said in the answer, not the server's log
# Bounds on what the web process compiles: a pattern for module names is a few dozen instructions; 64 KB holds
# a few thousand ('.{1000}' is refused), and compiling the most a recipe may hold takes milliseconds.
_RE2_OPTIONS.max_mem = 64 * 1024
MAX_RECIPE_PATTERNS = 64
_PATTERN_LISTS = ("targets", "ignore")


@functools.lru_cache(maxsize=1024)
def compiled_pattern(pattern: str) -> Any:
    """A 're:' pattern's expression (without the prefix), compiled by RE2; EngineError when RE2 cannot."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise EngineError(
            f"The recipe's pattern 're:{pattern[:100]}' is refused ({reason}): patterns are matched in linear "
            "time (RE2), without backreferences or lookarounds.",
            field="recipe",
        ) from None


def pattern_matches(target: str, name: str) -> bool:
    """compressed-tensors' match_name (an exact name, or a 're:' pattern found at the start of the name), with
    the pattern matched by RE2."""
    if target.startswith("re:"):
        return compiled_pattern(target[3:]).match(name) is not None
    return target == name


def _check_patterns(data: Any) -> None:
    """Every 're:' string of the recipe (targets, ignore, scheme targets, SmoothQuant and AWQ mappings)
    compiles under RE2, and there are at most MAX_RECIPE_PATTERNS of them."""
    patterns = _patterns(data)
    if len(patterns) > MAX_RECIPE_PATTERNS:
        raise EngineError(
            f"The recipe has {len(patterns)} different 're:' patterns; at most {MAX_RECIPE_PATTERNS} are allowed.",
            field="recipe",
        )
    for pattern in patterns:
        compiled_pattern(pattern[3:])


def _patterns(node: Any) -> set[str]:
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list):
        return {pattern for item in node for pattern in _patterns(item)}
    return {node} if isinstance(node, str) and node.startswith("re:") else set()


def linear_time_recipe(recipe_yaml: str, module_names: Iterable[str]) -> str:
    """The recipe for oneshot, with each 're:' pattern replaced by what RE2 matches among the model's modules.

    In a targets or ignore list a pattern becomes the names it matches (what vLLM also reads from the
    checkpoint's config); anywhere else (SmoothQuant's and AWQ's mappings) a pattern that matches exactly those
    names and cannot backtrack. A pattern that matches nothing becomes 're:(?!)', which matches nothing at once.
    """
    data = load_recipe_yaml(recipe_yaml)
    if not _patterns(data):
        return recipe_yaml
    names = list(dict.fromkeys(module_names))  # in the model's order: the recorded lists read layer by layer
    return yaml.safe_dump(_without_patterns(data, names), sort_keys=False)


def _without_patterns(node: Any, names: list[str], key: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _without_patterns(v, names, k) for k, v in node.items()}
    if key in _PATTERN_LISTS and isinstance(node, str | list):
        entries = [node] if isinstance(node, str) else node
        spliced = [name for entry in entries for name in _matched(entry, names)]
        return list(dict.fromkeys(spliced))
    if isinstance(node, list):
        return [_without_patterns(item, names) for item in node]
    if isinstance(node, str) and node.startswith("re:"):
        return "re:" + _exact_pattern(_matched(node, names))
    return node


def _matched(entry: Any, names: list[str]) -> list[str]:
    """A targets or ignore entry as names: a pattern's matches ('re:(?!)' if none), anything else as it is."""
    if not (isinstance(entry, str) and entry.startswith("re:")):
        return [entry]
    pattern = compiled_pattern(entry[3:])
    return [name for name in names if pattern.match(name) is not None] or ["re:(?!)"]


def _exact_pattern(names: list[str]) -> str:
    """A Python expression re.match accepts exactly these names with (to their end), built as a radix tree:
    the branches at each point start with different characters, so re tries one at most past its first."""
    if "re:(?!)" in names:
        return "(?!)"
    return _radix(set(names))


def _radix(names: set[str]) -> str:
    branches = [r"\Z"] if "" in names else []
    for first, group in itertools.groupby(sorted(n for n in names if n), key=lambda n: n[0]):
        prefix, rest = first, [n[1:] for n in group]
        while all(rest) and len({r[0] for r in rest}) == 1:
            prefix, rest = prefix + rest[0][0], [r[1:] for r in rest]
        branches.append(re.escape(prefix) + _radix(set(rest)))
    return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"


# Run in a child process: llm-compressor's modifiers, each with its arguments (None: any are accepted), and
# compressed-tensors' named schemes with their weights' group size. The registries are what Recipe.from_dict
# itself looks modifiers up in (ModifierFactory.create).
_LIBRARY_FACTS = """
import dataclasses, enum, json, types, typing
import pydantic


def kinds(annotation):
    # The YAML values a pydantic annotation admits, in engine.presets' words; None: not judged from the text.
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return kinds(args[0])
    if origin in (typing.Union, types.UnionType):
        found = [kinds(arg) for arg in args]
        return None if None in found else sorted(set().union(*found))
    if origin is typing.Literal:
        return ["=" + a for a in args] if all(isinstance(a, str) for a in args) else None
    if annotation is type(None):
        return ["null"]
    simple = {bool: ["boolean"], int: ["integer"], float: ["integer", "number"], str: ["string"]}
    if annotation in simple:
        return simple[annotation]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return sorted("=" + str(member.value) for member in annotation)
    if origin in (list, tuple) or annotation in (list, tuple):
        items = tuple(kinds(args[0]) or ()) if origin is list and args else ()
        choices = items and all(item.startswith("=") for item in items)
        return [LIST_OF.get(("string",) if choices else items, "list")]
    model = dataclasses.is_dataclass(annotation) or (
        isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel)
    )
    if origin is dict or annotation is dict or model:
        return ["mapping"]
    return None  # torch types, callables, sentinels: llm-compressor judges them in the worker


LIST_OF = {
    ("string",): "list of strings",
    ("integer", "number"): "list of numbers",
    ("list",): "list of lists",
    ("mapping",): "list of mappings",
}


def argument_kinds(registry):
    return {
        name: {f.alias or arg: kinds(f.annotation) for arg, f in cls.model_fields.items() if not arg.endswith("_")}
        for name, cls in registry.items() if name != "Modifier"
    }


from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from llmcompressor.modifiers import ModifierFactory
ModifierFactory.refresh()
registry = {**ModifierFactory._experimental_registry, **ModifierFactory._main_registry}
modifiers = {
    name: sorted(f.alias or field for field, f in cls.model_fields.items() if not field.endswith("_"))
    if cls.model_config.get("extra") == "forbid" else None
    for name, cls in registry.items() if name != "Modifier"
}
weights = {name: preset_name_to_scheme(name, ["Linear"]).weights for name in PRESET_SCHEMES}
groups = {name: w.group_size if w is not None else None for name, w in weights.items()}
print(json.dumps({"modifiers": modifiers, "scheme_group_sizes": groups, "arguments": argument_kinds(registry)}))
"""


@functools.cache
def library_facts() -> dict[str, Any] | None:
    """llm-compressor's modifiers and the arguments each takes (with the YAML values each admits, read from
    its pydantic annotations), and each named scheme's group size; None when llm-compressor is not installed.

    Importing llm-compressor imports torch, which the web process never does: a child process reads them
    once per llm-compressor version (a few seconds), and a file beside the model store keeps them.
    """
    from engine.artifacts import write_if_changed
    from engine.model_sources import default_store

    try:
        version = importlib.metadata.version("llmcompressor")
    except importlib.metadata.PackageNotFoundError:
        return None
    # Per llm-compressor version and per version of the script that reads it (a new fact, a new file).
    script = hashlib.sha256(_LIBRARY_FACTS.encode()).hexdigest()[:8]
    cache = default_store().parent / f"llmcompressor-facts-{version}-{script}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    listed = subprocess.run(
        [sys.executable, "-c", _LIBRARY_FACTS], capture_output=True, text=True, check=True, timeout=300
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_if_changed(cache, listed.stdout.strip().splitlines()[-1])
    return json.loads(cache.read_text())


def validate_recipe_yaml(text: str) -> str:
    """Check a custom recipe's text, then that llm-compressor accepts it; return it unchanged."""
    data = load_recipe_yaml(check_recipe_text(text))
    from llmcompressor.recipe import Recipe

    try:
        Recipe.from_dict(data)  # it has a modifier: check_recipe_text read the same layout
    except Exception as exc:  # llm-compressor raises many types (pydantic, KeyError, ValueError)
        raise EngineError(f"llm-compressor rejected the recipe: {exc}", field="recipe") from None
    return text


def _refuse_code(node: Any, where: str = "") -> None:
    """Refuse keys and values that llm-compressor would run as Python (calc(...)) or that name dunders."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        path = f"{where}.{key}" if where else str(key)
        for text in (key, value):
            found = _CODE_IN_STRING.search(text) if isinstance(text, str) else None
            if found:
                raise EngineError(
                    f"The recipe's '{path[:200]}' contains code ('{found.group(0)}'); a recipe is data and may "
                    "not hold expressions to run.",
                    field="recipe",
                )
        _refuse_code(value, path)


def recipe_group_sizes(text: str) -> set[int]:
    """Group sizes used by the recipe's weight quantization (for the divisibility checks); no torch needed."""
    return {group.group_size for group in recipe_weight_groups(text) if group.group_size}


@dataclass(frozen=True)
class WeightGroup:
    """What one scheme or config group of a quantizing modifier covers: the layers its targets match and its
    modifier's ignore does not (compressed-tensors' rule), quantized in groups of group_size (None: ungrouped)."""

    targets: tuple[str, ...]
    ignore: tuple[str, ...]
    group_size: int | None


def recipe_weight_groups(text: str) -> list[WeightGroup]:
    """Each quantizing scheme of the recipe with its targets and ignore list; no torch needed.

    A modifier names a scheme ("W4A16", or {"W4A16": [targets]}) or writes config groups; its targets default
    to Linear, as llm-compressor's quantizing modifiers do. Modifiers that quantize nothing are left out.
    """
    facts = library_facts()
    named = facts["scheme_group_sizes"] if facts else {}
    groups: list[WeightGroup] = []
    for args in _modifier_args(load_recipe_yaml(text)):
        targets, ignore = _names(args.get("targets")) or ("Linear",), _names(args.get("ignore"))
        scheme = args.get("scheme")
        schemes = {scheme: targets} if isinstance(scheme, str) else scheme if isinstance(scheme, dict) else {}
        for name, scheme_targets in schemes.items():
            size = named.get(name) if isinstance(name, str) else None
            groups.append(WeightGroup(_names(scheme_targets) or targets, ignore, int(size) if size else None))
        for group in (args.get("config_groups") or {}).values():
            if not isinstance(group, dict):
                continue
            size = (group.get("weights") or {}).get("group_size")
            groups.append(WeightGroup(_names(group.get("targets")) or targets, ignore, int(size) if size else None))
    return groups


def _names(value: Any) -> tuple[str, ...]:
    """A recipe's targets or ignore: one name, or a list of them."""
    if isinstance(value, str):
        return (value,)
    return tuple(str(item) for item in value) if isinstance(value, list | tuple) else ()


def recipe_ignore(text: str) -> set[str]:
    """Every layer name or 're:' pattern the recipe's modifiers leave alone."""
    return {name for args in _modifier_args(load_recipe_yaml(text)) for name in args.get("ignore") or []}


def recipe_needs_calibration(text: str) -> bool:
    """Whether any modifier of the recipe needs calibration data (llm-compressor's own answer)."""
    return bool(recipe_calibrating_modifiers(text))


def recipe_calibrating_modifiers(text: str) -> list[str]:
    """The recipe's modifiers that need calibration data, by class name: oneshot's default "independent"
    pipeline gives each of them a pass over the calibration data of its own."""
    from llmcompressor.recipe import Recipe

    modifiers = Recipe.from_dict(load_recipe_yaml(text)).modifiers
    return [type(m).__name__ for m in modifiers if m.requires_calibration_data]


# The modifiers that keep a Hessian for each Linear of the layer at work (the memory plan counts them).
HESSIAN_MODIFIERS = ("GPTQModifier", "SparseGPTModifier")


def recipe_uses_hessians(text: str) -> bool:
    """Whether the recipe runs GPTQ or SparseGPT, which keep a Hessian for each Linear of the layer at work."""
    from llmcompressor.recipe import Recipe

    modifiers = Recipe.from_dict(load_recipe_yaml(text)).modifiers
    return any(type(m).__name__ in HESSIAN_MODIFIERS for m in modifiers)


def recipe_names_hessians(text: str) -> bool:
    """recipe_uses_hessians from the text alone (no llm-compressor, no torch: the web process's estimate)."""
    return bool(_modifier_names(load_recipe_yaml(text)) & set(HESSIAN_MODIFIERS))


def _modifier_names(node: Any) -> set[str]:
    """The names of the modifiers anywhere in a parsed recipe (the keys that end in "Modifier")."""
    if isinstance(node, dict):
        return {key for key in node if str(key).endswith("Modifier")} | {
            name for value in node.values() for name in _modifier_names(value)
        }
    if isinstance(node, list):
        return {name for item in node for name in _modifier_names(item)}
    return set()


def _modifier_args(node: Any) -> list[dict[str, Any]]:
    """All modifier argument mappings found anywhere in a parsed recipe."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key.endswith("Modifier") and isinstance(value, dict):
                found.append(value)
            else:
                found.extend(_modifier_args(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_modifier_args(item))
    return found
