"""engine.library_patches, the one module that reaches into llm-compressor past its public API: what it relies
on is still there (an upgrade that changes it fails here, by name), its wrappers serve only the run that asked,
and no other module assigns to an llm-compressor attribute."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from engine import library_patches

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("engine", "jobs", "frontend", "compressor_app", "compressor_cli", "bench")


def test_llm_compressor_still_has_and_calls_what_the_patches_wrap():
    from llmcompressor.modifiers.gptq.base import GPTQModifier
    from llmcompressor.modifiers.pruning.sparsegpt.base import SparseGPTModifier
    from llmcompressor.pipelines.sequential.pipeline import SequentialPipeline

    # Installing checks the signatures and attributes it wraps (LibraryChanged names what changed)
    library_patches.install()
    library_patches.install()  # once per process: a second call changes nothing
    library_patches._broadcasting_modules()  # what a CPU rank of a data-parallel run replaces
    # ...and the callers still go through them: GPTQ and SparseGPT hand the loss to set_results, and the
    # sequential pipeline traces through the module-level name the wrapper replaces, with the model first
    assert "set_results(" in inspect.getsource(GPTQModifier.compress_module_list)
    assert "set_results(" in inspect.getsource(SparseGPTModifier.compress_modules)
    pipeline = inspect.getsource(SequentialPipeline.__call__)
    assert "trace_subgraphs(\n            model," in pipeline or "trace_subgraphs(model," in pipeline
    assert "subgraph.forward(model, **inputs)" in pipeline and "subgraph.submodules(model)" in pipeline


def test_a_library_without_what_a_patch_needs_is_refused_by_name():
    with pytest.raises(library_patches.LibraryChanged, match=r"llm-compressor \S+ changed: Subgraph.forward"):
        library_patches._require(False, "Subgraph.forward(model, **inputs)")


def test_errors_reach_only_the_run_whose_model_was_compressed(tiny_model_dir):
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine import calibration as calib
    from engine.presets import PRESETS
    from engine.spec import CalibrationSpec

    # Given two models, each with a run listening for its errors, and one of them compressed with GPTQ
    compressed = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = CalibrationSpec(samples=2, max_seq_len=16)
    dataset = calib.tokenize_records(calib.builtin_records(spec.samples), tokenizer, spec)
    mine, theirs = [], []
    with (
        library_patches.module_errors(compressed, lambda name, error: mine.append((name, error))),
        library_patches.module_errors(other, lambda name, error: theirs.append((name, error))),
    ):
        oneshot(
            model=compressed,
            tokenizer=tokenizer,
            recipe=PRESETS["int8-w8a8-gptq"].recipe_yaml(),
            dataset=dataset,
            num_calibration_samples=len(dataset),
            max_seq_length=spec.max_seq_len,
        )
    # Then every Linear of the compressed model is reported by its name, none to the other run
    linears = {name for name, module in compressed.named_modules() if isinstance(module, torch.nn.Linear)}
    assert sorted(name for name, _ in mine) == sorted(linears - {"lm_head"}) and theirs == []
    # ...and once both runs are over, nobody listens any more
    assert library_patches._error_listeners == [] and library_patches._subgraph_wrappers == {}


def _llmcompressor_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("llmcompressor")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llmcompressor"):
            names |= {a.asname or a.name for a in node.names}
    return names


def test_no_module_but_library_patches_assigns_to_an_llm_compressor_attribute():
    offenders = []
    for package in PRODUCT:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            names = _llmcompressor_names(tree)
            for node in ast.walk(tree):
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                for target in targets:
                    base = target
                    while isinstance(base, ast.Attribute):
                        base = base.value
                    if isinstance(target, ast.Attribute) and isinstance(base, ast.Name) and base.id in names:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args:
                    if isinstance(node.args[0], ast.Name) and node.args[0].id in names:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert {offender.split(":")[0] for offender in offenders} == {"engine/library_patches.py"}, offenders
