"""Build a randomly initialised model with Llama-3.2-1B's shape into a folder (once; the bench reuses it).

    .venv/bin/python bench/random_model.py var/bench/models/llama-3.2-1b-random
    .venv/bin/python bench/random_model.py DIR --shape small-8-heads    # the GPU check's tensor-parallel model

Llama-3.2-1B's config (hidden 2048, 16 layers, MLP 8192, 32 heads, 8 key-value heads, vocabulary 128256,
tied embeddings): 1.24 B parameters, 2.47 GB in bfloat16. Random weights (seed 0) are enough to measure
memory and time; the tokenizer is the built-in model's (its ids all lie inside the larger vocabulary).
Written to a temporary sibling and renamed, so an interrupted build is never taken for a finished one.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

LLAMA_3_2_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
# The GPU check's tensor-parallel load (bench/part_gpu.py): the built-in model's 9 attention heads do not split
# over 2 GPUs, these 8 heads (64 wide, a size every vLLM attention backend takes) and 4 key-value heads do.
SMALL_8_HEADS = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}
SHAPES = {"llama-3.2-1b": LLAMA_3_2_1B, "small-8-heads": SMALL_8_HEADS}


def build(target: Path, shape: dict = LLAMA_3_2_1B) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.model_sources import ensure_builtin_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)  # never a 5 GB float32 copy on the way
        model = LlamaForCausalLM(LlamaConfig(**shape, dtype="bfloat16"))
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(ensure_builtin_model()).save_pretrained(tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="the folder to create")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    args = parser.parse_args()
    print(build(args.target.resolve(), SHAPES[args.shape]))
