"""One rank of a data-parallel calibration, run by torchrun (engine.data_parallel starts it).

llm-compressor's distributed oneshot: each rank pushes its share of the calibration samples through the
model, the Hessians are reduced across ranks, and GPTQ's work is split between them module by module. On
GPUs each rank computes on its own device (compressed_tensors' init_dist, NCCL) with the weights offloaded
once for all ranks (load_offloaded_model); on a CPU worker the ranks talk over gloo. Saving is collective as
well: every rank calls save_pretrained, rank 0 writes the files. Each rank writes the per-layer errors of the
modules it compressed into the request's errors_dir.

With "resume" in the request ({"dir", "fingerprint"}: engine.runner computes the fingerprint), the ranks keep
each compressed layer in that store and skip the layers a killed run of the same work left there
(engine.layer_resume): rank 0 opens it first and writes it; the stored layers are restored by every rank on a CPU
worker, by rank 0 alone where the ranks share offloaded weights.

Usage: python -m torch.distributed.run --standalone --nproc-per-node N -m engine.dp_rank REQUEST.json
"""

from __future__ import annotations

import json
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from engine import calibration as calib
from engine.architectures import auto_model_class
from engine.layer_resume import LayerStore, SharedStore, decoder_layers, resumable_layers
from engine.library_patches import broadcast_cpu_modules_too
from engine.presets import linear_time_recipe
from engine.spec import CalibrationSpec
from engine.stages import Reporter, layer_error_hooks


def main(request_path: str) -> int:
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    request = json.loads(Path(request_path).read_text())
    auto_model = auto_model_class(json.loads((Path(request["model"]) / "config.json").read_text()))
    on_gpu = request["device"] != "cpu"
    loading = {"dtype": torch.bfloat16, "trust_remote_code": request["trust_remote_code"]}
    if on_gpu:
        from compressed_tensors.offload import init_dist, load_offloaded_model

        init_dist()
        with load_offloaded_model():
            model = auto_model.from_pretrained(request["model"], device_map="auto_offload", **loading)
    else:
        dist.init_process_group(backend="gloo")
        model = auto_model.from_pretrained(request["model"], **loading)
        broadcast_cpu_modules_too()
    try:
        _calibrate_and_save(model, AutoTokenizer.from_pretrained(request["model"]), request)
    finally:
        dist.destroy_process_group()
    return 0


def _calibrate_and_save(model, tokenizer, request: dict) -> None:
    import torch.distributed as dist
    from llmcompressor import oneshot

    spec = CalibrationSpec(**request["calibration"])
    records = request["records"][: spec.samples]
    dataset = calib.tokenize_records(rank_share(records, dist.get_rank(), dist.get_world_size()), tokenizer, spec)
    errors = Reporter(None, None)
    resumable = _resumable(model, request.get("resume"), errors, shared_weights=request["device"] != "cpu")
    with layer_error_hooks(model, errors), resumable:
        oneshot(
            model=model,
            tokenizer=tokenizer,
            # As engine.stages.run_oneshot: the recipe's 're:' patterns matched by RE2, never by Python's re.
            recipe=linear_time_recipe(request["recipe"], (name for name, _module in model.named_modules())),
            dataset=dataset,
            num_calibration_samples=len(dataset),
            max_seq_length=spec.max_seq_len,
            shuffle_calibration_samples=False,
        )
    # Each rank measured the modules whose GPTQ it ran: the parent gathers the ranks' files.
    Path(request["errors_dir"], f"rank-{dist.get_rank()}.json").write_text(json.dumps(errors.layer_errors))
    if dist.get_rank() == 0:
        print(f"Calibrated over {dist.get_world_size()} ranks; writing the checkpoint", flush=True)
    model.save_pretrained(request["out"], save_compressed=True)
    dist.barrier()


def _resumable(model, resume: dict | None, errors: Reporter, *, shared_weights: bool) -> AbstractContextManager:
    """The ranks' shared layer store, when the job can resume (engine.layer_resume with a SharedStore).

    shared_weights: the ranks share one offloaded copy of the weights (GPUs); on a CPU worker each has its own."""
    import torch.distributed as dist

    if not resume:
        return nullcontext()
    rank = dist.get_rank()

    def store() -> LayerStore:
        return LayerStore(Path(resume["dir"]), resume["fingerprint"], total=len(decoder_layers(model)))

    # Rank 0 opens it alone first: it empties a store of other work and drops a half-written file. The others
    # read it after that, and no rank writes before every rank has read which layers it holds.
    opened = store() if rank == 0 else None
    dist.barrier()
    if opened is None:
        opened = store()
    dist.barrier()

    def announce(line: str) -> None:
        if rank == 0:
            print(line, flush=True)  # a plain line: the job's log keeps it

    shared = SharedStore(
        writes=rank == 0, restores=rank == 0 or not shared_weights, gather=_every_ranks, synchronize=dist.barrier
    )
    return resumable_layers(model, opened, layer_errors=errors.layer_errors, announce=announce, shared=shared)


def _every_ranks(entries: list) -> list:
    """Every rank's entries, rank by rank (a collective: each rank calls it at the same point)."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, entries)
    return [entry for part in gathered for entry in part]


def rank_share(records: list, rank: int, ranks: int) -> list:
    """The rank's own contiguous share of the samples (every sample in exactly one share): each rank calibrates
    on its share and llm-compressor adds the ranks' Hessians up."""
    return records[len(records) * rank // ranks : len(records) * (rank + 1) // ranks]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
