"""Tiny random models of the families users bring, made from their transformers configs and laid out as hub
repositories are (sharded safetensors with an index, tokenizer and chat template, generation config), for the
local hub (tests/hub_server.py) and for engine runs on a folder.

Each is 2 decoder layers of hidden size 256 with 4 attention heads of 64 (a head size vLLM's CPU attention has
kernels for) and SmolLM2's tokenizer (vocabulary 49,152) from the built-in model's folder; random weights
(seed 0) in bfloat16. The MoE families have 4 experts, 2 per token, and their shared experts where the family
has them. The vision-language families (Idefics3, SmolVLM's architecture with a Llama language model, and Qwen2-VL)
are smaller still: hidden size 64 with one head of 64, a 2-layer vision tower of width 32, their image tokens added
to the tokenizer and their processor files beside them. bench/part_families.py and tests/jobs/test_families_service.py
share them.

    .venv/bin/python -m tests.families var/families      # writes every family's folder there
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
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
    "idefics3": ("Idefics3Config", {}),
    "qwen2-vl": ("Qwen2VLConfig", {}),
}


@dataclass(frozen=True)
class VisionParts:
    """What a vision-language family has beyond its text config: its vision tower, the tokens its processor puts
    in the prompt for an image (added to the tokenizer), and its processor's files (written as JSON: the image
    processors of transformers 5.17 ask for torchvision even to be built, which the service does not install)."""

    text: dict[str, Any]  # replaces _COMMON's sizes
    vision_config: dict[str, Any]
    model: dict[str, Any]  # the model config's own arguments
    image_tokens: list[str]
    token_ids: dict[str, str]  # the model config's token ids: config key -> token
    processor_files: dict[str, dict[str, Any]]


# The vision-language families: a text config inside the model's, and a vision tower of their own. Idefics3's
# processor puts <image> tokens (1 a tile here: (32 / 16)^2 patches / scale_factor^2) between tile markers.
_IDEFICS3_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
_VISION = {
    "idefics3": VisionParts(
        text={
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
        },
        model={"scale_factor": 2},
        image_tokens=_IDEFICS3_TOKENS + [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)],
        token_ids={"image_token_id": "<image>"},
        processor_files={
            "preprocessor_config.json": {
                "image_processor_type": "Idefics3ImageProcessor",
                "processor_class": "Idefics3Processor",
                "do_convert_rgb": True,
                "do_resize": True,
                "size": {"longest_edge": 64},  # at most 2 x 2 tiles of 32 pixels
                "resample": 1,
                "do_image_splitting": True,
                "max_image_size": {"longest_edge": 32},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "do_pad": True,
            },
            "processor_config.json": {"processor_class": "Idefics3Processor", "image_seq_len": 1},
        },
    ),
    # Qwen2-VL: multimodal rotary positions (mrope_section: a third of the head's 32 frequencies each for time,
    # height and width, as Qwen2-VL-2B's [16, 24, 24] for heads of 128), a vision tower that merges 2 x 2 patches
    # of 14 pixels into one token of the language model's width.
    "qwen2-vl": VisionParts(
        text={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
        },
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2},
        model={},
        image_tokens=["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
        token_ids={
            "vision_start_token_id": "<|vision_start|>",
            "vision_end_token_id": "<|vision_end|>",
            "image_token_id": "<|image_pad|>",
            "video_token_id": "<|video_pad|>",
        },
        processor_files={
            "preprocessor_config.json": {
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2VLProcessor",
                "min_pixels": 56 * 56,
                "max_pixels": 112 * 112,  # at most 16 image tokens
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            },
        },
    ),
}
_SHARD_BYTES = 10 * 2**20  # several shards, with an index, as the hub's repositories have them
_VISION_SHARD_BYTES = 2 * 2**20  # the tiny vision-language model is 7 MB: sharded too


def family_config(family: str, tokenizer):
    """The transformers config of `family` at the tiny size, with the tokenizer's vocabulary and special tokens."""
    import transformers

    class_name, extra = FAMILIES[family]
    config_class = getattr(transformers, class_name)
    tokens = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    text = {**_COMMON, **extra, "vocab_size": len(tokenizer), **tokens}
    vision = _VISION.get(family)
    if vision is None:
        return config_class(**text)
    return config_class(
        text_config={**text, **vision.text},
        vision_config=vision.vision_config,
        **{key: tokenizer.convert_tokens_to_ids(token) for key, token in vision.token_ids.items()},
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **vision.model,
        **tokens,
    )


def build_family(family: str, target: Path, tokenizer_dir: Path) -> Path:
    """Write `family`'s tiny model into target (once: an existing folder is kept), renamed into place when
    complete so that an interrupted build is never taken for a finished one."""
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vision = _VISION.get(family)
    if vision:
        tokenizer.add_special_tokens({"additional_special_tokens": vision.image_tokens})
    config = family_config(family, tokenizer)
    torch.manual_seed(0)
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=_VISION_SHARD_BYTES if vision else _SHARD_BYTES)
        tokenizer.save_pretrained(tmp)  # with SmolLM2's chat template
        for name, content in (vision.processor_files if vision else {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, max_new_tokens=64
        ).save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process built it meanwhile
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_vision_language(family: str) -> bool:
    return family in _VISION


def build_families(folder: Path, tokenizer_dir: Path, families: list[str] | None = None) -> dict[str, Path]:
    return {family: build_family(family, folder / family, tokenizer_dir) for family in families or FAMILIES}


def built_families(tokenizer_dir: Path, data_dir: Path) -> dict[str, Path]:
    """Every family's tiny model for the tests, built once into data_dir/test-families/<this file's hash>: the test
    modules that use them share one build, across sessions too, and a change here builds them anew (the folders of
    earlier versions are removed then)."""
    version = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    root = data_dir / "test-families"
    for old in root.glob("*"):
        if old.name != version and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    return build_families(root / version, tokenizer_dir)


def add_family_repos(hub, models: dict[str, Path], owner: str = "families") -> dict[str, str]:
    """Serve each family's folder from the local hub (tests/hub_server.HubServer): family -> repository id."""
    return {family: hub.add_folder(f"{owner}/tiny-{family}", folder).repo_id for family, folder in models.items()}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from engine.model_sources import ensure_builtin_model

    for name, path in build_families(Path(sys.argv[1]).resolve(), ensure_builtin_model()).items():
        print(name, path)


# What each family's presets leave out because vLLM keeps it unquantized: a MoE's router (and Qwen's shared gate),
# a vision-language model's vision tower and its connector to the language model.
KEPT_IN_BF16 = {
    "qwen2-moe": {"re:.*mlp.gate$", "re:.*shared_expert_gate$"},
    "qwen3-moe": {"re:.*mlp.gate$"},
    "mixtral": {"re:.*block_sparse_moe.gate$"},
    "deepseek-v3": {"re:.*mlp.gate$"},
    "idefics3": {"re:model.vision_model.*", "re:model.connector.*"},
    "qwen2-vl": {"re:.*visual.*"},
}
