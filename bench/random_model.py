"""Build a randomly initialised model with Llama-3.2-1B's shape into a folder (once; the bench reuses it).

    .venv/bin/python bench/random_model.py var/bench/models/llama-3.2-1b-random

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


def build(target: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.models import ensure_builtin_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)  # never a 5 GB float32 copy on the way
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_3_2_1B, dtype="bfloat16"))
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(ensure_builtin_model()).save_pretrained(tmp)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(build(Path(sys.argv[1]).resolve()))
