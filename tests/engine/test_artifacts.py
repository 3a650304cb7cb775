"""Checkpoint files: the weights hashed as they are written, a manifest that does not read them back, and the
safetensors files that any loader reads as it reads safetensors' own."""

from __future__ import annotations

import inspect

import pytest

from engine.artifacts import hashed_weights, sha256_file, verify_manifest, write_manifest, write_safetensors


@pytest.fixture
def tensors():
    import torch

    torch.manual_seed(0)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 48, dtype=torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight_scale": torch.rand(64, 1, dtype=torch.float32),
        "model.layers.0.mlp.up_proj.weight": torch.randint(-128, 127, (96, 64), dtype=torch.int8),
        "model.layers.0.mlp.down_proj.weight": torch.randn(32, 96).to(torch.float8_e4m3fn),
        "model.layers.0.mlp.gate_proj.weight_packed": torch.randint(0, 2**31 - 1, (32, 8), dtype=torch.int32),
        "model.norm.weight": torch.ones(64, dtype=torch.float16),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(16, 8).t(),  # not contiguous
    }


def test_write_safetensors_round_trips_and_returns_the_files_sha256(tensors, tmp_path):
    from safetensors import safe_open

    path = tmp_path / "model.safetensors"

    digest = write_safetensors(tensors, path, metadata={"format": "pt"})

    assert digest == sha256_file(path)
    with safe_open(str(path), framework="pt") as stored:
        assert stored.metadata() == {"format": "pt"}
        assert set(stored.keys()) == set(tensors)
        for name, tensor in tensors.items():
            loaded = stored.get_tensor(name)
            assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape, name
            assert loaded.view(-1).view(dtype=loaded.dtype).equal(tensor.contiguous().view(-1)), name


def test_save_pretrained_shards_are_hashed_as_written_and_the_manifest_takes_those_hashes(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    out = tmp_path / "checkpoint"

    # When transformers saves in several shards with the hashing writer in place
    with hashed_weights(out) as hashes:
        model.save_pretrained(out, max_shard_size="100KB")

    # Then every shard is hashed, by the bytes on disk, and the model loads back equal
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(hashes) == shards
    assert all(hashes[name] == ((out / name).stat().st_size, sha256_file(out / name)) for name in shards)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert all(a.equal(b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values(), strict=True))

    # The manifest is the one a second read gives; it takes the write-time hash without reading the shard: a byte
    # changed on disk since (same size) is still listed with the hash it was written with, and verify finds it
    assert write_manifest(out, hashed=hashes) == write_manifest(out)
    first = out / shards[0]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF
    first.write_bytes(bytes(data))
    manifest = write_manifest(out, hashed=hashes)
    assert next(f for f in manifest["files"] if f["path"] == shards[0])["sha256"] == hashes[shards[0]][1]
    assert verify_manifest(out) == [shards[0]]


def test_the_name_hashed_weights_replaces_is_the_one_save_pretrained_writes_shards_with():
    # transformers imports safetensors' save_file as modeling_utils.safe_save_file and calls it with
    # (shard, filename, metadata=...); the patch checks that shape (LibraryChanged otherwise) and puts the
    # library's own writer back afterwards.
    from safetensors.torch import save_file
    from transformers import PreTrainedModel, modeling_utils

    from engine.library_patches import safetensors_writer

    def writer(tensors, filename, metadata=None):
        pass

    with safetensors_writer(writer):
        assert modeling_utils.safe_save_file is writer
    assert modeling_utils.safe_save_file is save_file
    assert "safe_save_file(shard_state_dict, filename, metadata=metadata)" in inspect.getsource(
        PreTrainedModel.save_pretrained
    )
