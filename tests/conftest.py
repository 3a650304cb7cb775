"""Shared fixtures: the built-in model (converted once into the cached model store) and a tiny model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.models import builtin_model_dir, default_store


@pytest.fixture(scope="session")
def builtin_model() -> Path:
    """The built-in SmolLM2-135M-Instruct as bf16 safetensors (make test prepares it first)."""
    from engine.cli import prepare_builtin_model

    return prepare_builtin_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, builtin_model: Path) -> Path:
    """A tiny random-weight Llama with the built-in model's tokenizer: fast to compress on a CPU."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(builtin_model)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model that a test may alter."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture(scope="session")
def model_store() -> Path:
    return default_store()


@pytest.fixture(scope="session")
def builtin_dir(model_store: Path, builtin_model: Path) -> Path:
    assert builtin_model == builtin_model_dir(model_store)
    return builtin_model
