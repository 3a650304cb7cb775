"""Tiny random models of the families users bring, made from their transformers configs and laid out as hub
repositories are (sharded safetensors with an index, tokenizer and chat template, generation config), for the
local hub (tests/hub_server.py) and for engine runs on a folder.

Each is 2 decoder layers of hidden size 256 with 4 attention heads of 64 (a head size vLLM's CPU attention has
kernels for) and SmolLM2's tokenizer (vocabulary 49,152) from the built-in model's folder; random weights
(seed 0) in bfloat16. The MoE families have 4 experts, 2 per token, and their shared experts where the family
has them. bench/part_families.py and tests/engine/test_families.py share them.

    .venv/bin/python -m tests.families var/families      # writes every family's folder there
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# What every family shares: small enough to compress in seconds, shaped as vLLM's CPU build can serve.
_COMMON: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
_MOE: dict[str, Any] = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256}

# family -> (transformers config class, its arguments beyond _COMMON). The class names are transformers'.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3": ("LlamaConfig", {"rope_theta": 500000.0}),
    "qwen2.5": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "qwen2-moe": ("Qwen2MoeConfig", {**_MOE, "shared_expert_intermediate_size": 512, "decoder_sparse_step": 1}),
    "qwen3-moe": ("Qwen3MoeConfig", {**_MOE, "decoder_sparse_step": 1}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "deepseek-v3": (
        "DeepseekV3Config",
        {
            "num_key_value_heads": 4,  # multi-head latent attention: as many key-value heads as query heads
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "moe_intermediate_size": 256,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "kv_lora_rank": 64,
            "q_lora_rank": 128,
            "qk_rope_head_dim": 32,
            "qk_nope_head_dim": 64,
            "v_head_dim": 64,
            "head_dim": 32,
        },
    ),
    "gemma2": ("Gemma2Config", {}),
    "gemma3": ("Gemma3TextConfig", {"sliding_window": 512}),
    "mistral": ("MistralConfig", {}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
    "qwen2-vl": ("Qwen2VLConfig", {}),
}

# The vision-language families: a text config inside the model's, and a vision tower of their own.
_VISION = {
    "qwen2-vl": {
        "vision_config": {"depth": 2, "embed_dim": 64, "hidden_size": 256, "num_heads": 4, "mlp_ratio": 2},
    },
}
_SHARD_BYTES = 10 * 2**20  # several shards, with an index, as the hub's repositories have them


def family_config(family: str, tokenizer):
    """The transformers config of `family` at the tiny size, with the tokenizer's vocabulary and special tokens."""
    import transformers

    class_name, extra = FAMILIES[family]
    config_class = getattr(transformers, class_name)
    tokens = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    text = {**_COMMON, **extra, "vocab_size": len(tokenizer), **tokens}
    if family in _VISION:
        return config_class(text_config=text, **_VISION[family], tie_word_embeddings=True, **tokens)
    return config_class(**text)


def build_family(family: str, target: Path, tokenizer_dir: Path) -> Path:
    """Write `family`'s tiny model into target (once: an existing folder is kept), renamed into place when
    complete so that an interrupted build is never taken for a finished one."""
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = family_config(family, tokenizer)
    torch.manual_seed(0)
    auto = AutoModelForImageTextToText if family in _VISION else AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=_SHARD_BYTES)
        tokenizer.save_pretrained(tmp)  # with SmolLM2's chat template
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, max_new_tokens=64
        ).save_pretrained(tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_families(folder: Path, tokenizer_dir: Path, families: list[str] | None = None) -> dict[str, Path]:
    return {family: build_family(family, folder / family, tokenizer_dir) for family in families or FAMILIES}


def add_family_repos(hub, models: dict[str, Path], owner: str = "families") -> dict[str, str]:
    """Serve each family's folder from the local hub (tests/hub_server.HubServer): family -> repository id."""
    return {family: hub.add_folder(f"{owner}/tiny-{family}", folder).repo_id for family, folder in models.items()}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from engine.model_sources import ensure_builtin_model

    for name, path in build_families(Path(sys.argv[1]).resolve(), ensure_builtin_model()).items():
        print(name, path)
