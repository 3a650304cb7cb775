"""The memory plan: how a job runs on this worker, from the model's size and the worker's resources.

The ways a job can run, tried in this order:
- gpu: the whole model fits on one GPU; it is loaded there and never moves.
- sequential: the model waits in host memory and llm-compressor's sequential pipeline brings one decoder
  layer at a time to the GPU (on a CPU-only worker: the whole model in host memory, computed on the CPU).
- disk_offload: host memory is short. compressed-tensors keeps what fits of the weights in host memory and
  the rest on disk (load_offloaded_model, device_map="auto_offload"), in a folder of the job's own that is
  removed when the job ends; each layer is read from disk when it computes.
- refused: nothing fits. The PreflightError gives needed and available for host memory, GPU and disk.

A job runs on a set of the worker's GPUs: the number it asks for, or as many as the plan needs (the fewest
whose free memory holds the whole model for evaluation). llm-compressor computes on one of them (its
sequential pipeline brings each layer to one execution device); evaluation spreads a model that does not
fit on one GPU over the set, and vLLM uses tensor parallelism over it, which splits the attention heads
evenly between the GPUs.

The figures are estimates from the model's shapes (ModelShape: a skeleton on the meta device in the worker, the
safetensors header at submission, where jobs.nodes picks a worker that can hold the job):
the runner loads every model in bfloat16 (2 bytes a parameter); GPTQ and SparseGPT keep a float32 Hessian
of in_features x in_features for each Linear of the layer they work on; the sequential pipeline holds
every calibration sample's activations between two layers in host memory. Evaluation follows the same
plan (engine.evaluation loads both models with placed_model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.artifacts import checkpoint_space_bytes
from engine.errors import PreflightError
from engine.resources import Gpu, WorkerResources
from engine.units import size_text

GPU, SEQUENTIAL, DISK_OFFLOAD = "gpu", "sequential", "disk_offload"
# Each way's name as the job page and the model card show it.
MODE_LABELS = {
    GPU: "whole model on one GPU",
    SEQUENTIAL: "sequential (the model in host memory, one decoder layer at a time)",
    DISK_OFFLOAD: "disk offload",
}
# The resources a plan weighs (the keys of MemoryPlan.to_dict()["figures"]), as the pages name them.
FIGURE_LABELS = {"host_ram": "Host memory", "gpu": "GPU memory", "disk": "Disk"}

_LOAD_BYTES_PER_PARAM = 2  # the runner loads every model in bfloat16, whatever its files hold
_GPU_RESERVE_BYTES = 1_000_000_000  # the CUDA context and the allocator's fragmentation
# Saving compresses module by module and the compressed copies live beside the bf16 weights for a while:
# measured on the bench's 1 B model (fp8-dynamic), the job's peak is 1.43 x the weights over the idle worker.
_SAVE_COPY_SHARE = 0.25
# What a run holds in host memory besides the weights: the tokenizer, calibration data, Python objects,
# safetensors read buffers. The worker's imports are already resident before the job, so not counted.
_HOST_RESERVE_BYTES = 500_000_000
# With disk offload, the checkpoint is written shard by shard, each shard gathered in host memory first.
_MIN_OFFLOAD_SHARD_BYTES = 10_000_000
_MAX_OFFLOAD_SHARD_BYTES = 5_000_000_000


@dataclass(frozen=True)
class ModelFootprint:
    """The sizes the plan weighs, from the model's shapes, the recipe and the calibration settings."""

    num_parameters: int
    num_layers: int
    layer_parameters: int  # the largest decoder layer
    attention_heads: int = 0  # vLLM's tensor parallelism needs them divisible by the number of GPUs
    layer_work_bytes: int = 0  # GPTQ/SparseGPT: the Hessians of one layer and a float32 copy of its largest Linear
    activation_bytes: int = 0  # one calibration sample through one layer, and its logits at the end
    calibration_cache_bytes: int = 0  # every sample's activations between two layers (host memory)

    @property
    def weights_bytes(self) -> int:
        return self.num_parameters * _LOAD_BYTES_PER_PARAM

    @property
    def layer_bytes(self) -> int:
        return self.layer_parameters * _LOAD_BYTES_PER_PARAM


@dataclass(frozen=True)
class ModelShape:
    """The model's sizes the footprint is made of: from a skeleton on the meta device (the worker) or from the
    safetensors header and config.json (the submission, in the web process: no torch)."""

    num_parameters: int
    num_layers: int
    layer_parameters: int  # the largest decoder layer
    # (in_features, weight elements) of each Linear of the first decoder layer: what GPTQ/SparseGPT hold
    first_layer_linears: tuple[tuple[int, int], ...] = ()
    hidden_size: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0
    head_dim: int = 0
    attention_heads: int = 0

    def to_dict(self) -> dict[str, Any]:
        # Field by field: dataclasses.asdict copies each pair of first_layer_linears deeply, at each submission.
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {**values, "first_layer_linears": [list(pair) for pair in self.first_layer_linears]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelShape:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in names}
        values["first_layer_linears"] = tuple(tuple(pair) for pair in values.get("first_layer_linears") or ())
        return cls(**values)


# A decoder layer's tensors in a safetensors header: model.layers.<i>.<...> (or any prefix before "layers").
_LAYER_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def header_shape(config: dict[str, Any], tensors: dict[str, tuple[str, tuple[int, ...]]]) -> ModelShape | None:
    """The shape from config.json and a safetensors header (name -> (dtype, shape)), without torch.

    None without a header (pickle weights only): the worker's preflight sizes such a model from its modules.
    """
    if not tensors:
        return None
    per_layer: dict[int, int] = {}
    first_linears: list[tuple[int, int]] = []
    for name, (_dtype, dims) in tensors.items():
        match = _LAYER_TENSOR.search(name)
        if match is None:
            continue
        index = int(match.group(1))
        per_layer[index] = per_layer.get(index, 0) + math.prod(dims)
        if index == 0 and name.endswith(".weight") and len(dims) == 2:
            first_linears.append((dims[1], dims[0] * dims[1]))  # a Linear's weight is (out, in)
    text = config.get("text_config") or config
    return ModelShape(
        num_parameters=sum(math.prod(dims) for _dtype, dims in tensors.values()),
        num_layers=len(per_layer),
        layer_parameters=max(per_layer.values(), default=0),
        first_layer_linears=tuple(sorted(first_linears)),
        **_text_sizes(text.get),
    )


def skeleton_shape(skeleton) -> ModelShape:
    """The shape of a model given as a skeleton on the meta device (shapes without memory)."""
    import torch

    config = skeleton.config.get_text_config()
    layers = list(getattr(getattr(skeleton, "model", skeleton), "layers", None) or [])
    linears = [m for m in layers[0].modules() if isinstance(m, torch.nn.Linear)] if layers else []
    return ModelShape(
        num_parameters=sum(p.numel() for p in skeleton.parameters()),
        num_layers=len(layers),
        layer_parameters=max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0),
        first_layer_linears=tuple(sorted((m.in_features, m.weight.numel()) for m in linears)),
        **_text_sizes(lambda name: getattr(config, name, None)),
    )


def _text_sizes(get) -> dict[str, int]:
    """The text model's widths from its config (an object's attributes or a dict's keys, through `get`)."""
    hidden = int(get("hidden_size") or 0)
    heads = int(get("num_attention_heads") or 1)
    return {
        "hidden_size": hidden,
        "intermediate_size": int(get("intermediate_size") or 4 * hidden),
        "vocab_size": int(get("vocab_size") or 0),
        "head_dim": int(get("head_dim") or hidden // heads),
        "attention_heads": int(get("num_attention_heads") or 0),
    }


def model_footprint(skeleton, *, hessians: bool, samples: int, max_seq_len: int) -> ModelFootprint:
    """The footprint of a model given as a skeleton on the meta device (shapes without memory).

    samples is 0 for a data-free recipe: no calibration forward pass, no activations.
    """
    return shape_footprint(skeleton_shape(skeleton), hessians=hessians, samples=samples, max_seq_len=max_seq_len)


def shape_footprint(shape: ModelShape, *, hessians: bool, samples: int, max_seq_len: int) -> ModelFootprint:
    """The footprint from the model's shape, the recipe (Hessians or not) and the calibration settings."""
    work = 0
    if hessians and shape.first_layer_linears:
        linears = shape.first_layer_linears
        work = sum(4 * width**2 for width, _ in linears) + max(8 * elements for _, elements in linears)
    hidden, head_dim = shape.hidden_size, shape.head_dim
    tokens = max_seq_len if samples else 0
    # bf16 activations of one sample: residual, norms and attention projections, the MLP's gate, up and
    # product, and the logits of the last step; between layers, each sample's hidden states and rotary tables
    # (input and output of the layer at once).
    activation = 2 * tokens * (6 * hidden + 3 * shape.intermediate_size + shape.vocab_size)
    cache = 2 * 2 * samples * tokens * (hidden + 2 * head_dim)
    return ModelFootprint(
        num_parameters=shape.num_parameters,
        num_layers=shape.num_layers,
        layer_parameters=shape.layer_parameters,
        attention_heads=shape.attention_heads,
        layer_work_bytes=work,
        activation_bytes=activation,
        calibration_cache_bytes=cache,
    )


@dataclass(frozen=True)
class Need:
    """One resource's figure: what the plan needs of it and what the worker has."""

    needed: int
    available: int

    @property
    def fits(self) -> bool:
        return self.needed <= self.available

    def to_dict(self, *, capped: bool) -> dict[str, Any]:
        return {"needed": self.needed, "available": self.available, "capped": capped}


@dataclass(frozen=True)
class Placement:
    """Where a model's weights wait and where its layers compute: what loading a model needs of the plan."""

    mode: str = SEQUENTIAL
    device: str = "cpu"  # where the layers compute
    gpu_bytes: int = 0  # sequential on a GPU: how much of the model may stay on the GPU while evaluating
    # The job's GPUs (index, bytes evaluation may fill), the computing one first: evaluation spreads the model
    # over them and vLLM runs with tensor parallelism over them.
    gpus: tuple[tuple[int, int], ...] = ()
    host_weights_bytes: int = 0  # disk_offload: the weights kept in host memory, the rest waits on disk
    host_share: float = 1.0  # disk_offload: that share of the weights (for a checkpoint stored smaller)
    scratch: Path | None = None  # disk_offload: where offload folders are made (the job's staging folder)


@dataclass(frozen=True)
class MemoryPlan:
    mode: str
    device: str  # where the layers compute: "cuda:0" or "cpu"
    host: Need
    disk: Need
    gpu: Need | None = None
    gpu_name: str = ""
    offloaded_bytes: int = 0  # disk_offload: the weights that wait on disk
    host_weights_bytes: int = 0  # disk_offload: the weights kept in host memory
    shard_bytes: int | None = None  # disk_offload: the largest checkpoint shard gathered in memory at once
    gpus: tuple[Gpu, ...] = ()  # the job's GPUs, the one llm-compressor computes on first
    data_parallel: int = 1  # calibration ranks (engine.data_parallel); 1: in the worker's own process
    capped: tuple[str, ...] = field(default=())

    @property
    def tensor_parallel_size(self) -> int:
        return len(self.gpus)

    def placement(self, scratch: Path | None = None) -> Placement:
        return Placement(
            mode=self.mode,
            device=self.device,
            gpu_bytes=self.gpu.available if self.gpu else 0,
            gpus=tuple((gpu.index, _usable(gpu)) for gpu in self.gpus),
            host_weights_bytes=self.host_weights_bytes,
            host_share=self.host_weights_bytes / ((self.host_weights_bytes + self.offloaded_bytes) or 1),
            scratch=scratch,
        )

    @property
    def summary(self) -> str:
        """The plan in one sentence, as the job page and the model card show it."""
        parts = [self._placement_summary]
        if self.data_parallel > 1:
            between = "one rank per GPU" if self.gpu else "gloo between CPU processes"
            parts.append(f"calibration data-parallel over {self.data_parallel} ranks ({between})")
        count = len(self.gpus)
        if count > 1:
            indices = ", ".join(f"cuda:{gpu.index}" for gpu in self.gpus)
            parts.append(f"evaluation and the vLLM check over {count} GPUs ({indices}, tensor parallel {count})")
        return "; ".join(parts)

    @property
    def _placement_summary(self) -> str:
        host = f"{size_text(self.host.needed)} of {size_text(self.host.available)} available"
        gpu = f"{size_text(self.gpu.needed)} of {size_text(self.gpu.available)} free" if self.gpu else ""
        if self.mode == GPU:
            return f"the whole model on the GPU ({gpu}), loaded there once"
        if self.mode == SEQUENTIAL and self.gpu:
            return (
                f"the model in host memory ({host}); llm-compressor's sequential pipeline brings one decoder "
                f"layer at a time to the GPU ({gpu})"
            )
        if self.mode == SEQUENTIAL:
            return f"the whole model in host memory ({host})"
        where = "the GPU" if self.gpu else "the CPU"
        return (
            f"disk offload, host memory being short: {size_text(self.host_weights_bytes)} of the weights in host "
            f"memory, {size_text(self.offloaded_bytes)} on disk ({size_text(self.disk.needed)} of "
            f"{size_text(self.disk.available)} free, the checkpoint included), each layer read when it computes "
            f"on {where}"
        )

    def to_dict(self) -> dict[str, Any]:
        # capped: the operator's cap (engine.resources) lowered the available figure.
        figures = {
            "host_ram": self.host.to_dict(capped="host_ram" in self.capped),
            "disk": self.disk.to_dict(capped="disk" in self.capped),
        }
        if self.gpu:
            figures["gpu"] = {**self.gpu.to_dict(capped="gpu_memory" in self.capped), "name": self.gpu_name}
        return {
            "mode": self.mode,
            "device": self.device,
            "summary": self.summary,
            "figures": figures,
            "offloaded_bytes": self.offloaded_bytes,
            "host_weights_bytes": self.host_weights_bytes,
            "gpus": [{"index": gpu.index, "name": gpu.name, "free": gpu.free_bytes} for gpu in self.gpus],
            "tensor_parallel_size": self.tensor_parallel_size,
            "data_parallel": self.data_parallel,
            "capped": list(self.capped),
        }


def plan_memory(
    footprint: ModelFootprint,
    resources: WorkerResources,
    *,
    device: str = "auto",
    gpus: int | None = None,
    data_parallel: int | None = None,
) -> MemoryPlan:
    """Choose how the job runs here (see the module's docstring); raise PreflightError when nothing fits.

    gpus: how many GPUs the job asks for; None: as many as the plan needs.
    data_parallel: the operator's calibration ranks (None: one per GPU of a job with several; see
    data_parallel_ranks).
    """
    if device.startswith("cuda") and not resources.gpus:
        raise PreflightError("A GPU was requested but this worker has none.", field="device")
    job_gpus = job_gpu_set(footprint, resources.gpus, gpus)
    gpu = job_gpus[0] if job_gpus else None
    fp, host_ram = footprint, resources.host_ram_bytes
    disk = Need(checkpoint_space_bytes(fp.weights_bytes), resources.disk_free_bytes)
    common = {"disk": disk, "capped": resources.capped, "gpus": job_gpus}
    # The layer's work (Hessians, activations) is done where it computes: on the GPU, or in host memory.
    host_work = fp.calibration_cache_bytes + _HOST_RESERVE_BYTES
    if gpu is not None:
        common.update(device=f"cuda:{gpu.index}", gpu_name=gpu.name)
        whole = Need(_held(fp) + fp.layer_work_bytes + fp.activation_bytes + _GPU_RESERVE_BYTES, gpu.free_bytes)
        if whole.fits and host_work <= host_ram and disk.fits:
            ranks = data_parallel_ranks(fp, job_gpus, data_parallel)
            return MemoryPlan(mode=GPU, host=Need(host_work, host_ram), gpu=whole, data_parallel=ranks, **common)
        layer = Need(fp.layer_bytes + fp.layer_work_bytes + fp.activation_bytes + _GPU_RESERVE_BYTES, gpu.free_bytes)
        if not layer.fits:
            raise PreflightError(_layer_refusal(fp, layer, gpu), field="device")
        common["gpu"] = layer
    else:
        common["device"] = "cpu"
        host_work += fp.layer_work_bytes + fp.activation_bytes
    if not disk.fits:
        raise PreflightError(_disk_refusal(disk, offloaded=0))
    sequential = Need(_held(fp) + host_work, host_ram)
    if sequential.fits:
        ranks = data_parallel_ranks(fp, job_gpus, data_parallel)
        if not job_gpus and ranks > 1:  # CPU processes: each rank holds its own copy of the model
            with_ranks = Need(_held(fp) * ranks + host_work, host_ram)
            sequential, ranks = (with_ranks, ranks) if with_ranks.fits else (sequential, 1)
        return MemoryPlan(mode=SEQUENTIAL, host=sequential, data_parallel=ranks, **common)
    shard = min(max(2 * fp.layer_bytes, _MIN_OFFLOAD_SHARD_BYTES), _MAX_OFFLOAD_SHARD_BYTES)
    # In host memory besides the weights it keeps: the layer read from disk, the next one, a checkpoint shard.
    offload = Need(host_work + 2 * fp.layer_bytes + shard, host_ram)
    if not offload.fits:
        raise PreflightError(_host_refusal(fp, sequential, offload, common.get("gpu")), field=_host_field(fp, offload))
    # What is left keeps weights, with room for their compressed copies at saving (always short of all of them,
    # or the sequential plan would have fitted).
    kept = int((host_ram - host_work - fp.layer_bytes - shard) / (1 + _SAVE_COPY_SHARE))
    offloaded = fp.weights_bytes - kept
    common["disk"] = Need(disk.needed + offloaded, disk.available)  # updated weights are written there
    if not common["disk"].fits:
        raise PreflightError(_disk_refusal(common["disk"], offloaded=offloaded))
    return MemoryPlan(
        mode=DISK_OFFLOAD,
        host=offload,
        offloaded_bytes=offloaded,
        host_weights_bytes=kept,
        shard_bytes=shard,
        **common,
    )


def search_plan(
    footprint: ModelFootprint,
    resources: WorkerResources,
    *,
    device: str = "auto",
    gpus: int | None = None,
    data_parallel: int | None = None,
) -> MemoryPlan:
    """The plan of a floor search or a sweep (engine.search): it holds the original weights and a trial's copy
    at once, in the same place, and keeps the chosen trial's checkpoint on disk beside the one being written:
    twice the weights, in memory and on disk; and never disk offload (each trial would read the model back)."""
    doubled = dataclasses.replace(footprint, num_parameters=2 * footprint.num_parameters)
    plan = plan_memory(doubled, resources, device=device, gpus=gpus, data_parallel=data_parallel)
    if plan.mode == DISK_OFFLOAD:
        raise PreflightError(
            f"A floor search keeps the model and a copy of it in memory, and here that only fits with disk "
            f"offload ({plan.summary}); run the presets as separate jobs, or on a larger worker.",
            field="search",
        )
    return plan


def job_gpu_set(fp: ModelFootprint, gpus: tuple[Gpu, ...], requested: int | None) -> tuple[Gpu, ...]:
    """The job's GPUs, those with the most free memory first: `requested` of them, or (None) the fewest that
    hold the whole model for evaluation, else as many as tensor parallelism can use."""
    ranked = sorted(gpus, key=lambda gpu: (-gpu.free_bytes, gpu.index))
    if requested is not None:
        if requested > len(ranked):
            have = f"{len(ranked)}" if ranked else "none"
            raise PreflightError(
                f"This job asks for {requested} GPU{'s' if requested > 1 else ''}; this worker has {have}. "
                "Ask for fewer, or for as many as the plan needs.",
                field="gpus",
            )
        problem = tensor_parallel_problem(fp.attention_heads, requested)
        if problem:
            raise PreflightError(problem, field="gpus")
        return tuple(ranked[:requested])
    counts = [n for n in range(1, len(ranked) + 1) if tensor_parallel_problem(fp.attention_heads, n) is None]
    for count in counts:
        if _spread_need(fp, ranked[:count]).fits:
            return tuple(ranked[:count])
    return tuple(ranked[: counts[-1]]) if counts else ()


def data_parallel_ranks(fp: ModelFootprint, job_gpus: tuple[Gpu, ...], asked: int | None) -> int:
    """How many ranks calibrate: data parallelism pays where GPTQ or SparseGPT pushes calibration data through
    the model (Hessians to reduce, modules to split); one rank per GPU of a job with several, unless the
    operator chose (asked: 1 off, N ranks, on a GPU worker at most one per GPU)."""
    if not (fp.layer_work_bytes and fp.calibration_cache_bytes) or asked == 1:
        return 1
    if asked:
        return min(asked, len(job_gpus)) if job_gpus else asked
    return len(job_gpus) if len(job_gpus) > 1 else 1


def tensor_parallel_problem(attention_heads: int, gpus: int) -> str | None:
    """Why vLLM cannot split the model over `gpus` GPUs (its attention heads unevenly divided), else None."""
    if gpus <= 1 or not attention_heads or attention_heads % gpus == 0:
        return None
    valid = [str(n) for n in range(1, min(attention_heads, 8) + 1) if attention_heads % n == 0]
    return (
        f"vLLM's tensor parallelism splits the model's {attention_heads} attention heads evenly between the GPUs: "
        f"{gpus} GPUs cannot share them. Ask for {', '.join(valid)} GPU(s), or for as many as the plan needs."
    )


def _spread_need(fp: ModelFootprint, gpus: list[Gpu]) -> Need:
    """Evaluation with the whole model spread over `gpus`: each one's share of the weights, per GPU."""
    share = -(-fp.weights_bytes // len(gpus))
    return Need(share + fp.activation_bytes + _GPU_RESERVE_BYTES, min(gpu.free_bytes for gpu in gpus))


def _usable(gpu: Gpu) -> int:
    """What evaluation may place on a GPU: its free memory less the CUDA context's reserve."""
    return max(gpu.free_bytes - _GPU_RESERVE_BYTES, 0)


def _held(fp: ModelFootprint) -> int:
    """What holding the whole model takes, its compressed copies at saving included."""
    return int(fp.weights_bytes * (1 + _SAVE_COPY_SHARE))


def _host_field(fp: ModelFootprint, offload: Need) -> str:
    """The calibration settings are to blame when the model would fit without their activations."""
    return "calibration" if offload.needed - fp.calibration_cache_bytes <= offload.available else "model"


def _host_refusal(fp: ModelFootprint, sequential: Need, offload: Need, gpu: Need | None) -> str:
    parts = [
        f"This model does not fit on this worker: it has {_count_text(fp.num_parameters)} parameters "
        f"({size_text(fp.weights_bytes)} in bfloat16).",
        f"Host memory: {size_text(sequential.needed)} needed to hold the whole model, at least "
        f"{size_text(offload.needed)} with disk offload; {size_text(offload.available)} available.",
    ]
    if gpu is not None:
        parts.append(f"GPU: {size_text(gpu.needed)} needed for one layer, {size_text(gpu.available)} free.")
    if fp.calibration_cache_bytes:
        parts.append(
            f"The calibration activations alone take {size_text(fp.calibration_cache_bytes)}: fewer samples "
            "or a shorter maximum sequence length need less."
        )
    parts.append("Run it on a worker with more memory.")
    return " ".join(parts)


def _count_text(count: int) -> str:
    return f"{count / 1e9:.2f} B" if count >= 10**9 else f"{count / 1e6:.1f} M"


def _layer_refusal(fp: ModelFootprint, layer: Need, gpu: Gpu) -> str:
    hessians = " and its Hessians" if fp.layer_work_bytes else ""
    return (
        f"One decoder layer{hessians} needs about {size_text(layer.needed)} of GPU memory; the GPU "
        f"({gpu.name or f'cuda:{gpu.index}'}) has {size_text(layer.available)} free."
    )


def _disk_refusal(disk: Need, *, offloaded: int) -> str:
    offload = f", {size_text(offloaded)} of it for the weights offloaded to disk" if offloaded else ""
    return (
        f"Not enough free disk space for the checkpoint: it needs about {size_text(disk.needed)}{offload}, and "
        f"{size_text(disk.available)} are free where checkpoints are stored. Free some space and retry."
    )


# --- loading a model the way the plan says ---------------------------------------------------------


@contextlib.contextmanager
def placed_model(path: Path, placement: Placement, **from_pretrained: Any) -> Iterator[Any]:
    """A causal LM (or a vision-language model: engine.architectures.auto_model_class) from `path` in bfloat16,
    placed as the plan says; its offload folder goes at the end.

    gpu: loaded onto the GPU. sequential: in host memory (llm-compressor brings each layer to the GPU itself;
    evaluation dispatches what fits of it onto the GPU). disk_offload: compressed-tensors' offloading, with
    host memory limited to the plan's share of the weights.
    """
    import torch

    from engine.architectures import auto_model_class

    auto_model = auto_model_class(json.loads((Path(path) / "config.json").read_text()))
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, **from_pretrained}
    if placement.mode != DISK_OFFLOAD:
        if placement.mode == GPU:
            kwargs["device_map"] = placement.device
        yield auto_model.from_pretrained(path, **kwargs)
        return
    from compressed_tensors.offload import load_offloaded_model

    # The budget is counted in the files' sizes: a compressed checkpoint (fp8, int4) is dequantized after
    # loading, so it keeps the planned share of its files in host memory, which then grows to the plan's bytes.
    files = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    budget = min(placement.host_weights_bytes, int(placement.host_share * files))
    folder = Path(tempfile.mkdtemp(prefix=".offload-", dir=placement.scratch))
    try:
        # Patched from_pretrained only while loading: a later load (the other model) chooses its own way.
        with load_offloaded_model():
            model = auto_model.from_pretrained(
                path,
                device_map="auto_offload",
                max_memory={"cpu": max(budget, 1)},
                offload_folder=str(folder),
                **kwargs,
            )
        yield model
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def ready_for_inference(model, placement: Placement):
    """Evaluation's placement on a GPU worker when the model does not fit on the GPU (never a whole-model
    .to(device)): sequential dispatches what fits of it onto the job's GPUs and onloads the rest module by module;
    disk offload onloads each module from disk to the GPU. On the CPU, and on the GPU plan, nothing moves."""
    if placement.device == "cpu" or placement.mode == GPU:
        return model
    import torch
    from compressed_tensors.offload import dispatch_model, set_onload_device

    if placement.mode != DISK_OFFLOAD:
        memory = {torch.device(f"cuda:{index}"): free for index, free in placement.gpus[1:]}
        memory = {torch.device(placement.device): placement.gpu_bytes, **memory}
        return dispatch_model(model, device_memory=memory)
    return set_onload_device(model, placement.device)
