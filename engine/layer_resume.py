"""Resume an interrupted calibration from the decoder layers it had already compressed.

llm-compressor's sequential pipeline pushes the calibration data through one subgraph (one decoder layer)
at a time: a calibrating pass whose hooks feed the modifiers (GPTQ's Hessians, observers), the
modifiers' sequential_epoch_end (GPTQ quantizes the layer's Linears there), then a propagating pass with the
hooks disabled whose outputs are the next layer's inputs. resumable_layers() wraps the traced subgraphs
(through engine.library_patches, which owns the one hook into the pipeline):

- after a layer's epoch end, its compressed state (every parameter and buffer the modifiers left on its
  modules: the quantized-dequantized weights, weight_scale, weight_zero_point, global scales; not the
  observers, which calibration_end removes) is written to the job's LayerStore;
- on a later run with the same fingerprint, each stored layer gets its state back before its first pass,
  runs both passes with the modifiers' hooks disabled (no Hessian, no observer: only the forward that the
  later layers' inputs need) and hands the modifiers no module at its epoch end, so nothing is compressed
  twice. The quantization config is the recipe's, applied by oneshot to every layer as in any run.

The store writes each file to a temporary name and renames it, the index last, so a SIGKILL at any moment
leaves an index that names only complete layer files.

A data-parallel run (engine.dp_rank) shares one store between its ranks (SharedStore): the stored layers
are restored by each rank (or by rank 0 alone over shared offloaded weights), and rank 0 writes each new one
with the errors every rank measured for it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INDEX_NAME = "index.json"
_VERSIONED = ("llmcompressor", "compressed-tensors", "torch", "transformers")


def resume_fingerprint(*, recipe_yaml: str, model_key: str, calibration_ids: list[list[int]], device: str) -> str:
    """What must be equal for stored layers to be what this run would compute: the recipe, the baseline
    weights, the calibration tokens, the device kind and the libraries' versions."""
    versions = {name: importlib.metadata.version(name) for name in _VERSIONED}
    payload = {"recipe": recipe_yaml, "model": model_key, "device": device, "versions": versions}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    digest.update(json.dumps(calibration_ids).encode())
    return digest.hexdigest()


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(temporary path) then rename it onto path: readers see the old file or the whole new one."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


class LayerStore:
    """A run's saved layers in one folder: layer-<i>.safetensors per compressed layer and index.json
    ({"fingerprint", "total", "done"}). A store whose fingerprint differs is emptied when opened."""

    def __init__(self, folder: Path, fingerprint: str, total: int) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.total = total
        self.done: list[int] = self._read_done()

    def _read_done(self) -> list[int]:
        try:
            index = json.loads((self.folder / INDEX_NAME).read_text())
        except (OSError, ValueError):
            index = None
        expected = {"fingerprint": self.fingerprint, "total": self.total}
        if isinstance(index, dict) and all(index.get(key) == value for key, value in expected.items()):
            for partial in self.folder.glob(".*"):  # a write a kill interrupted (never named by the index)
                partial.unlink(missing_ok=True)
            return sorted(int(i) for i in index.get("done", []) if self._layer_path(int(i)).is_file())
        self.remove()  # another job's, another recipe's or an older library's layers: none of them apply
        return []

    def done_prefix(self) -> int:
        """How many layers from the first one are stored (the run resumes at that layer)."""
        count = 0
        while count in self.done:
            count += 1
        return count

    def _layer_path(self, index: int) -> Path:
        return self.folder / f"layer-{index:05d}.safetensors"

    def save(self, index: int, tensors: dict[str, Any], errors: list[dict[str, Any]]) -> None:
        """Store a layer's tensors with its modules' compression errors (the per-layer error chart's)."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        metadata = {"errors": json.dumps(errors)}
        _write_atomically(self._layer_path(index), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        self.done = sorted(set(self.done) | {index})
        payload = json.dumps({"fingerprint": self.fingerprint, "total": self.total, "done": self.done})
        _write_atomically(self.folder / INDEX_NAME, lambda tmp: tmp.write_text(payload))

    def load(self, index: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A stored layer's tensors and its modules' compression errors."""
        from safetensors import safe_open

        with safe_open(str(self._layer_path(index)), framework="pt") as stored:
            tensors = {key: stored.get_tensor(key) for key in stored.keys()}
            return tensors, json.loads((stored.metadata() or {}).get("errors", "[]"))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def decoder_layers(model) -> list:
    """The language model's decoder layers (a vision-language model's too: get_decoder is its language model)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    return list(getattr(decoder, "layers", None) or [])


def _compressed_state(model, modules: list) -> dict[str, Any]:
    """Every parameter and buffer of these modules by its name in the model, observers left out."""
    names = {module: name for name, module in model.named_modules()}
    state: dict[str, Any] = {}
    for module in modules:
        for sub_name, sub in module.named_modules(prefix=names[module]):
            if sub_name.rsplit(".", 1)[-1].endswith("_observer") or "_observer." in sub_name:
                continue
            for attr, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
                state[f"{sub_name}.{attr}"] = tensor.detach().to("cpu").contiguous().clone()
    return state


def _restore_state(model, state: dict[str, Any]) -> None:
    from compressed_tensors.offload import update_offload_parameter

    for key, tensor in state.items():
        module_name, attr = key.rsplit(".", 1)
        # Parameters and buffers alike, in host memory, on the GPU or in a disk offload folder.
        update_offload_parameter(model.get_submodule(module_name), attr, tensor)


class _ResumableSubgraph:
    """One traced subgraph of the sequential pipeline, with its layer's state saved or restored."""

    def __init__(self, subgraph, layer: int | None, restored: bool, run: _ResumingRun) -> None:
        self._subgraph = subgraph
        self.layer = layer
        self.restored = restored
        self._run = run
        self.input_names = subgraph.input_names
        self.consumed_names = subgraph.consumed_names

    def forward(self, model, **inputs):
        from llmcompressor.modifiers.utils.hooks import HooksMixin

        self._run.save_pending(model)
        if not self.restored:
            return self._subgraph.forward(model, **inputs)
        self._run.restore_once(model, self)
        with HooksMixin.disable_hooks():  # no Hessians, no observers: the layer is compressed already
            return self._subgraph.forward(model, **inputs)

    def submodules(self, model, recurse: bool = True) -> list:
        """Called for the modifiers' epoch end: a restored layer gives them nothing to compress."""
        if self.restored:
            return []
        modules = self._subgraph.submodules(model, recurse=recurse)
        if self.layer is not None:
            self._run.pending = (self, self._subgraph.submodules(model, recurse=False))
        return modules


@dataclass(frozen=True)
class SharedStore:
    """How the ranks of a data-parallel run share one store. Each rank measured the errors of the modules it
    compressed, so a layer's errors are gathered from all of them, and rank 0 alone writes. A stored layer is
    restored by every rank where each holds its own copy of the model (a CPU worker), by rank 0 alone where
    the ranks share offloaded weights (compressed-tensors: one writer per parameter); then they synchronize,
    so that no rank computes with a layer before it is restored."""

    writes: bool
    restores: bool
    gather: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
    synchronize: Callable[[], None]


class _ResumingRun:
    def __init__(self, store: LayerStore, layer_errors: list[dict[str, Any]], shared: SharedStore | None) -> None:
        self.store = store
        self.layer_errors = layer_errors
        self.shared = shared
        self.pending: tuple[_ResumableSubgraph, list] | None = None
        self._restored: set[int] = set()

    def save_pending(self, model) -> None:
        """The epoch end of the pending layer has returned (the pipeline moved on): store what it left."""
        if self.pending is None:
            return
        subgraph, modules = self.pending
        self.pending = None
        names = {module: name for name, module in model.named_modules()}
        prefixes = tuple(f"{names[module]}." for module in modules)
        errors = [entry for entry in self.layer_errors if entry["module"].startswith(prefixes)]
        if self.shared is not None:
            errors = self.shared.gather(errors)  # every rank reaches this point once per layer
            if not self.shared.writes:
                return
        self.store.save(subgraph.layer, _compressed_state(model, modules), errors)

    def restore_once(self, model, subgraph: _ResumableSubgraph) -> None:
        if subgraph.layer in self._restored:
            return
        self._restored.add(subgraph.layer)
        if self.shared is None or self.shared.restores:
            tensors, errors = self.store.load(subgraph.layer)
            _restore_state(model, tensors)
            self.layer_errors.extend(errors)  # as the run that compressed the layer measured them
        if self.shared is not None:
            self.shared.synchronize()


@contextmanager
def resumable_layers(
    model,
    store: LayerStore,
    *,
    layer_errors: list[dict[str, Any]],
    announce: Callable[[str], None],
    shared: SharedStore | None = None,
) -> Iterator[None]:
    """While llm-compressor's sequential pipeline runs: save each layer it compresses and skip the
    calibration and compression of the layers the store already has (see the module's docstring).

    layer_errors: the run's per-module compression errors ({"module", "error"}), which GPTQ and SparseGPT
    append to as they compress; a stored layer keeps its own, and they come back with it.
    shared: for a rank of a data-parallel run (engine.dp_rank); None in one process."""
    from engine.library_patches import traced_subgraphs

    layers = decoder_layers(model)
    resume_at = store.done_prefix()
    run = _ResumingRun(store, layer_errors, shared)

    def resumable(subgraphs: list) -> list:
        wrapped = []
        for subgraph in subgraphs:
            direct = set(subgraph.submodules(model, recurse=False))
            layer = next((i for i, module in enumerate(layers) if module in direct), None)
            wrapped.append(_ResumableSubgraph(subgraph, layer, layer is not None and layer < resume_at, run))
        if resume_at:
            announce(
                f"Resuming from layer {resume_at} of {len(layers)} "
                f"(layers 0–{resume_at - 1} restored from the interrupted run)"
            )
        return wrapped

    with traced_subgraphs(model, resumable):
        yield
