"""The places where the engine reaches into llm-compressor (and one of transformers) past its public API; this
module owns them, and no other module assigns to a library's attribute.

llm-compressor's public extension points do not cover them: its lifecycle events go to the recipe's modifiers
only (and oneshot's "independent" pipeline hands each pass a recipe of one modifier, so a modifier of our own
would miss the others' passes), and its loguru METRIC lines carry neither the module nor more than two decimals.

1. Per-module compression errors. GPTQ and SparseGPT measure each module in a CompressionLogger and hand it the
   exact loss through set_results(name, loss); module_errors() wraps that method to receive (module, loss).
2. The sequential pipeline's traced subgraphs. llmcompressor.pipelines.sequential.pipeline calls
   trace_subgraphs(model, ...) and then forward(model, **inputs) and submodules(model) on each subgraph;
   traced_subgraphs() lets engine.layer_resume replace the list for one model.
3. Data-parallel GPTQ on CPU ranks. After splitting the modules between the ranks, GPTQ and the quantization
   modifier broadcast each owner's results, except for modules on the CPU (which llm-compressor takes to be
   offloaded weights all ranks share); broadcast_cpu_modules_too() makes them broadcast every module, for a
   rank process of engine.dp_rank whose model is its own copy in host memory.
4. transformers' shard writer. save_pretrained writes each safetensors shard by calling safetensors' save_file
   under the name modeling_utils imported it as (safe_save_file) with (shard, filename, metadata=...);
   safetensors_writer() puts the engine's writer there for a block, so each shard is hashed while it is written
   (engine.artifacts.hashed_weights) instead of read again.

The first two wrappers are installed once, on first use, and stay: it hands the call to whatever is registered for the
model at hand, so runs that overlap in one process (a search's trials, tests) never undo each other's patch.
Installing checks the shape the wrapper relies on and raises LibraryChanged when llm-compressor no longer has
it, so an upgrade fails loudly on its first run (and in tests/engine/test_stages_library_patches.py) instead
of compressing without errors or without resuming.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from engine.errors import EngineError

_lock = threading.Lock()
_error_listeners: list[Callable[[Any, float], None]] = []
_subgraph_wrappers: dict[int, Callable[[list], list]] = {}  # id(model) -> what replaces its traced subgraphs
_installed: set[str] = set()


class LibraryChanged(EngineError):
    """The installed llm-compressor no longer has what a patch here relies on."""


def _require(condition: bool, what: str) -> None:
    if not condition:
        import importlib.metadata

        version = importlib.metadata.version("llmcompressor")
        raise LibraryChanged(f"llm-compressor {version} changed: {what} (engine/library_patches.py relies on it).")


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def _accepts(function, *args, **kwargs) -> bool:
    try:
        inspect.signature(function).bind(*args, **kwargs)
    except TypeError:
        return False
    return True


def _install_error_patch() -> None:
    from llmcompressor.utils.metric_logging import CompressionLogger

    set_results = CompressionLogger.set_results
    _require(_parameters(set_results) == ["self", "name", "loss"], "CompressionLogger.set_results(self, name, loss)")
    _require(_parameters(CompressionLogger.__init__) == ["self", "module"], "CompressionLogger(module)")

    def set_results_and_record(self, name=None, loss=None):
        if loss is not None:
            for listener in list(_error_listeners):
                listener(self.module, float(loss))
        return set_results(self, name=name, loss=loss)

    CompressionLogger.set_results = set_results_and_record


def _install_subgraph_patch() -> None:
    import llmcompressor.pipelines.sequential.helpers as helpers
    import llmcompressor.pipelines.sequential.pipeline as sequential

    original = getattr(sequential, "trace_subgraphs", None)
    _require(callable(original), "llmcompressor.pipelines.sequential.pipeline.trace_subgraphs")
    _require(_parameters(original)[:1] == ["model"], "trace_subgraphs(model, ...)")
    subgraph = getattr(helpers, "Subgraph", None)
    _require(subgraph is not None, "llmcompressor.pipelines.sequential.helpers.Subgraph")
    _require(_accepts(subgraph.forward, None, "model", input_ids=None), "Subgraph.forward(model, **inputs)")
    _require(_accepts(subgraph.submodules, None, "model", recurse=False), "Subgraph.submodules(model, recurse)")
    fields = set(getattr(subgraph, "__dataclass_fields__", {}))
    _require({"input_names", "consumed_names"} <= fields, "Subgraph.input_names and Subgraph.consumed_names")

    def trace_and_wrap(model, *args, **kwargs):
        subgraphs = original(model, *args, **kwargs)
        wrap = _subgraph_wrappers.get(id(model))
        return wrap(subgraphs) if wrap is not None else subgraphs

    sequential.trace_subgraphs = trace_and_wrap


def _broadcasting_modules() -> tuple[list, Callable]:
    """The modifiers' modules that broadcast GPTQ's results, and the function they broadcast with."""
    from llmcompressor.modifiers.gptq import base as gptq
    from llmcompressor.modifiers.quantization.quantization import base as quantization
    from llmcompressor.utils.dist import broadcast_qparams_and_cleanup

    _require("skip_cpu" in _parameters(broadcast_qparams_and_cleanup), "broadcast_qparams_and_cleanup(skip_cpu=)")
    for module in (gptq, quantization):
        _require(
            getattr(module, "broadcast_qparams_and_cleanup", None) is broadcast_qparams_and_cleanup,
            f"{module.__name__} broadcasts with llmcompressor.utils.dist.broadcast_qparams_and_cleanup",
        )
    return [gptq, quantization], broadcast_qparams_and_cleanup


def broadcast_cpu_modules_too() -> None:
    """For the rest of this process (a data-parallel rank on a CPU worker, engine.dp_rank): every rank holds its
    own copy of the model, so without this rank 0 would save the other ranks' modules unquantized by GPTQ;
    gloo carries CPU tensors, so each module is broadcast."""
    import functools

    modules, broadcast = _broadcasting_modules()
    for module in modules:
        module.broadcast_qparams_and_cleanup = functools.partial(broadcast, skip_cpu=False)


def install() -> None:
    """Install both wrappers (once per process); LibraryChanged if llm-compressor no longer fits them."""
    with _lock:
        for name, install_one in (("errors", _install_error_patch), ("subgraphs", _install_subgraph_patch)):
            if name not in _installed:
                install_one()
                _installed.add(name)


@contextmanager
def module_errors(model, record: Callable[[str, float], None]) -> Iterator[None]:
    """While inside: record(module's name in `model`, exact loss) for each of its modules GPTQ or SparseGPT
    compresses (another model's modules, a concurrent run's, are not reported here)."""
    install()
    names = {module: name for name, module in model.named_modules()}

    def listener(module, loss: float) -> None:
        if module in names:
            record(names[module], loss)

    with _lock:
        _error_listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _error_listeners.remove(listener)


@contextmanager
def traced_subgraphs(model, wrap: Callable[[list], list]) -> Iterator[None]:
    """While inside: the sequential pipeline runs on wrap(subgraphs it traced) when it calibrates `model`.
    Each item wrap returns must offer what the pipeline uses: input_names, consumed_names, forward(model,
    **inputs) and submodules(model, recurse=True)."""
    install()
    with _lock:
        _subgraph_wrappers[id(model)] = wrap
    try:
        yield
    finally:
        with _lock:
            _subgraph_wrappers.pop(id(model), None)


@contextmanager
def safetensors_writer(write: Callable[..., None]) -> Iterator[None]:
    """While inside: transformers' save_pretrained writes each shard with write(tensors, filename, metadata=...)."""
    from safetensors.torch import save_file
    from transformers import PreTrainedModel, modeling_utils

    if getattr(modeling_utils, "safe_save_file", None) is not save_file or "safe_save_file(" not in (
        inspect.getsource(PreTrainedModel.save_pretrained)
    ):
        import importlib.metadata

        version = importlib.metadata.version("transformers")
        raise LibraryChanged(
            f"transformers {version} changed: save_pretrained no longer writes shards through "
            "modeling_utils.safe_save_file (engine/library_patches.py relies on it)."
        )
    with _lock:
        modeling_utils.safe_save_file = write
    try:
        yield
    finally:
        with _lock:
            modeling_utils.safe_save_file = save_file
