"""What each kind of model needs beyond a plain causal LM: the transformers class that loads it, its MoE experts
linearized for llm-compressor, and whether it has a vision tower. Read from config.json alone, so the
submission check, the memory plan and the worker all decide alike.
"""

from __future__ import annotations

# The config keys transformers' MoE families count their routed experts by (Qwen MoE, Mixtral, DeepSeek).
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")


def is_moe(config: dict) -> bool:
    text = config.get("text_config") or config
    return any((text.get(key) or 0) > 1 for key in _EXPERT_COUNTS)


def linearize_experts(model, config: dict) -> None:
    """A MoE model's experts as llm-compressor intends: each a Linear of its own, which GPTQ calibrates and
    save_pretrained writes back as the checkpoint had them (llmcompressor.modeling.moe.linearize).

    Right after loading, not through load_quantizable_moe: in transformers 5.17 that loader's class patching
    lists every transformers module, one of which imports torchvision (an image processor), which the worker
    does not install. oneshot would do the same after its warning; done here, the warning is not given.
    """
    if is_moe(config):
        from llmcompressor.modeling.moe.linearize import linearize_moe

        linearize_moe(model)


def auto_model_class(config: dict):
    """transformers' auto class that loads the model: a causal LM, or a vision-language model (image-text-to-text),
    which is calibrated and evaluated on text through its language model, its vision tower left as it is."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    return AutoModelForImageTextToText


def is_vision_language(config: dict) -> bool:
    """A model with a vision tower of its own beside its language model (config.json's vision_config)."""
    return bool(config.get("vision_config"))
