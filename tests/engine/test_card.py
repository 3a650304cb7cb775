from engine.card import results_table, write_model_card
from engine.presets import PRESETS
from engine.spec import CalibrationSpec

EVALUATION = {
    "metrics": [
        {"name": "perplexity", "label": "Perplexity (held-out text)", "baseline": 17.46, "compressed": 17.91,
         "recovery": 97.49, "higher_is_better": False},
        {"name": "arc", "label": "ARC Challenge (25-shot)", "baseline": 58.87, "compressed": 56.74,
         "recovery": 96.38, "higher_is_better": True, "baseline_stderr": 1.1, "compressed_stderr": 1.2, "task": True},
    ],
    "average": None,
    "generations": [{"prompt": "Hi?", "baseline": "Hello.", "compressed": "Hello there."}],
    "tasks_failed": [{"task": "gsm8k", "reason": "the hub cannot be reached"}],
    "settings": {"offline": True, "windows": 16, "window_tokens": 256, "heldout": "pydoc_data.topics",
                 "tasks": ["arc"], "backend": "hf", "limit": None},
}  # fmt: skip


def test_results_table_has_the_seed_cards_columns():
    table = results_table(EVALUATION, baseline_name="base", compressed_name="small")
    lines = table.splitlines()
    assert lines[0] == "| Benchmark | base | small (this model) | Recovery |"
    assert "| Perplexity (held-out text) | 17.46 | 17.91 | 97.49% |" in lines
    assert "| ARC Challenge (25-shot) | 58.87 ± 1.10 | 56.74 ± 1.20 | 96.38% |" in lines


def test_card_has_every_section_with_the_numbers(tmp_path):
    path = write_model_card(
        tmp_path,
        model_name="smol-w8a8",
        base_model="smollm2-135m-instruct",
        architecture="LlamaForCausalLM",
        preset=PRESETS["sparse24-fp8-dynamic"],
        recipe_yaml=PRESETS["sparse24-fp8-dynamic"].recipe_yaml(),
        calibration=CalibrationSpec(samples=64, max_seq_len=512),
        evaluation=EVALUATION,
        size_before_bytes=269_000_000,
        size_after_bytes=163_000_000,
    )
    card = path.read_text()
    for heading in ("# smol-w8a8", "## Model Overview", "### Model Optimizations", "## Creation", "## Deployment",
                    "## Evaluation"):  # fmt: skip
        assert heading in card
    assert "**Sparsity:** 2:4" in card and "saved dense" in card
    assert "64 samples of at most 512 tokens" in card and "SparseGPTModifier" in card
    assert "from vllm import LLM" in card and "oneshot(" in card
    assert "17.91" in card and "96.38%" in card and "gsm8k: not run" in card
    assert "163.0 MB instead of 269.0 MB" in card


def test_card_without_evaluation_or_preset_still_reads_well(tmp_path):
    card = write_model_card(
        tmp_path,
        model_name="custom",
        base_model="m",
        architecture="LlamaForCausalLM",
        preset=None,
        recipe_yaml="quant_stage: {}\n",
        calibration=None,
        evaluation=None,
        size_before_bytes=10,
        size_after_bytes=5,
    ).read_text()
    assert "custom recipe" in card and "Not evaluated" in card and "data-free" in card
