"""The model card: the seed cards' sections and table, from an evaluation result (no model needed)."""

import pytest
import yaml

from engine.card import results_table, write_model_card
from engine.presets import PRESETS
from engine.spec import CalibrationSpec

EVALUATION = {
    "metrics": [
        {"name": "perplexity", "label": "Perplexity (held-out text)", "baseline": 17.46, "compressed": 17.91,
         "recovery": 97.49, "higher_is_better": False, "baseline_stderr": None, "compressed_stderr": None,
         "n_shot": None, "task": False},
        {"name": "kl_divergence", "label": "KL divergence from baseline", "baseline": 0.0, "compressed": 0.027,
         "recovery": None, "higher_is_better": False, "baseline_stderr": None, "compressed_stderr": None,
         "n_shot": None, "task": False},
        {"name": "arc_challenge", "label": "ARC Challenge (25-shot)", "baseline": 58.87, "compressed": 56.74,
         "recovery": 96.38, "higher_is_better": True, "baseline_stderr": 1.1, "compressed_stderr": 1.2,
         "n_shot": 25, "task": True},
        {"name": "compressor_arithmetic", "label": "compressor_arithmetic (3-shot)", "baseline": 44.0,
         "compressed": 40.0, "recovery": 90.91, "higher_is_better": True, "baseline_stderr": 4.99,
         "compressed_stderr": 4.92, "n_shot": 3, "task": True},
    ],
    "average": {"baseline": 51.435, "compressed": 48.37, "recovery": 94.04},
    "generations": [{"prompt": "Hi?", "baseline": "Hello.", "compressed": "Hello there.\nHow can I help?"}],
    "tasks_failed": [{"task": "gsm8k", "reason": "The hub cannot be reached."}],
    "settings": {"offline": True, "windows": 16, "window_tokens": 256, "scored_tokens": 4080,
                 "heldout_name": "pydoc_data.topics", "tasks": ["arc_challenge", "compressor_arithmetic", "gsm8k"],
                 "backend": "hf", "limit": None},
    "baseline_cache_hit": False,
}  # fmt: skip


def card_for(tmp_path, **overrides):
    arguments = {
        "model_name": "smol-sparse24-fp8-dynamic",
        "base_model": "smollm2-135m-instruct",
        "architecture": "LlamaForCausalLM",
        "preset": PRESETS["sparse24-fp8-dynamic"],
        "recipe_yaml": PRESETS["sparse24-fp8-dynamic"].recipe_yaml(),
        "calibration": CalibrationSpec(samples=64, max_seq_len=512),
        "evaluation": EVALUATION,
        "size_before_bytes": 269_000_000,
        "size_after_bytes": 163_000_000,
        "settings": {
            "device": "cpu",
            "memory_plan": {
                "mode": "sequential",
                "device": "cpu",
                "summary": "the whole model in host memory (1.04 GB of 22.00 GB available)",
                "figures": {
                    "host_ram": {"needed": 1040000000, "available": 22000000000, "capped": False},
                    "disk": {"needed": 333_000_000, "available": 80_000_000_000, "capped": False},
                },
                "offloaded_bytes": 0,
                "host_weights_bytes": 0,
                "capped": [],
            },
        },
        **overrides,
    }
    return write_model_card(tmp_path, **arguments).read_text()


def test_results_table_has_the_seed_cards_columns_and_an_average_of_the_tasks():
    lines = results_table(EVALUATION, baseline_name="base", compressed_name="small").splitlines()
    assert lines[0] == "| Benchmark | base | small (this model) | Recovery |"
    assert "| Perplexity (held-out text) | 17.46 | 17.91 | 97.49 % |" in lines
    assert "| KL divergence from baseline | 0.0000 | 0.0270 | — |" in lines  # no recovery: it compares already
    assert "| ARC Challenge (25-shot) | 58.87 ± 1.10 | 56.74 ± 1.20 | 96.38 % |" in lines
    assert lines[-1] == "| Average (lm-eval tasks) | 51.44 | 48.37 | 94.04 % |"


def test_card_has_every_section_with_the_numbers(tmp_path):
    card = card_for(tmp_path)
    headings = ["# smol-sparse24-fp8-dynamic", "## Model Overview", "### Model Optimizations", "## Creation",
                "## Deployment", "## Evaluation", "### Accuracy"]  # fmt: skip
    positions = [card.index(f"\n{heading}\n") for heading in headings]
    assert positions == sorted(positions)
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "sparsity" in front["tags"]
    assert "**Sparsity:** 2:4" in card and "saved dense" in card and "lm_head" in card
    assert "minimizing the MSE" in card and "163.0 MB instead of 269.0 MB (39 % smaller on disk)" in card
    assert "64 samples of at most 512 tokens" in card and "SparseGPTModifier" in card and "oneshot(" in card
    assert "from vllm import LLM, SamplingParams" in card
    assert "17.91" in card and "96.38 %" in card and "` gsm8k `: not run. The hub cannot be reached." in card
    assert "16 windows of up to 256 tokens (4080 tokens scored)" in card
    assert "ARC Challenge (25-shot), compressor\\_arithmetic (3-shot)" in card
    assert "Recovery is the compressed model's score as a percentage of the baseline's" in card
    assert "average score of 48.37 on the evaluated tasks, whereas the original model achieves 51.44" in card
    assert "--tasks arc_challenge --num_fewshot 25 --batch_size auto" in card
    assert "--tasks compressor_arithmetic --num_fewshot 3 --include_path lm_tasks" in card
    # Generations keep their own lines (no literal \\n); the device that ran the job is named
    assert "This model:\n\n> Hello there.\\\n> How can I help?" in card and "\\n" not in card
    assert "**Compressed on:** cpu" in card and "It ran on cpu: the whole model in host memory" in card
    assert (
        "Memory plan, sequential (the model in host memory, one decoder layer at a time): host memory 1.04 GB "
        "needed, 22.00 GB available; disk 333.0 MB needed, 80.00 GB available." in card
    )


@pytest.mark.parametrize(
    ("run", "settings_line", "model_args"),
    [
        # a 405 B model over the job's 8 GPUs: the reader's GPUs need the same 8 ranks and context length
        (
            {"device": "gpu", "tensor_parallel_size": 8, "max_model_len": 2048},
            "(vllm backend, tensor parallel over 8 GPUs):",
            "gpu_memory_utilization=0.4,tensor_parallel_size=8,add_bos_token=True,max_model_len=2048 --tasks",
        ),
        # CPU ranks split a model that fits one GPU: the reader's GPU needs no tensor parallelism
        (
            {"device": "cpu", "tensor_parallel_size": 2, "max_model_len": 4096},
            "(vllm backend on the CPU, tensor parallel over 2 CPU ranks):",
            "gpu_memory_utilization=0.4,add_bos_token=True,max_model_len=4096 --tasks",
        ),
    ],
)
def test_a_card_of_tasks_scored_in_vllm_says_how_and_gives_the_command_that_ran_them(
    tmp_path, run, settings_line, model_args
):
    evaluation = {**EVALUATION, "settings": {**EVALUATION["settings"], "backend": "vllm", "vllm": run}}

    card = card_for(tmp_path, evaluation=evaluation)

    assert settings_line in card
    assert f"--model_args pretrained=smol-sparse24-fp8-dynamic,dtype=auto,{model_args} arc_challenge" in card
    assert card.count("tensor_parallel_size") == (2 if run["device"] == "gpu" else 0)  # one per task command


def test_card_without_evaluation_or_preset_still_reads_well(tmp_path):
    recipe = "quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      scheme: W4A16\n      ignore: [lm_head]\n"
    card = card_for(tmp_path, model_name="custom", preset=None, recipe_yaml=recipe, calibration=None, evaluation=None)
    assert "custom: GPTQModifier (scheme W4A16)" in card
    assert "Layers it leaves in their original precision: ` lm_head `." in card
    assert "Not evaluated" in card and "data-free" in card and "scheme: W4A16" in card


def test_card_of_a_data_free_preset_names_the_layers_left_out(tmp_path):
    preset = PRESETS["fp8-dynamic"]
    recipe = preset.recipe_yaml(extra_ignore=["model.layers.0.mlp.down_proj"])
    card = card_for(tmp_path, preset=preset, recipe_yaml=recipe, calibration=CalibrationSpec(kind="none"))
    assert "data-free" in card and "dataset=ds" not in card and "sparsity" not in card.split("---")[1]
    assert "also left in their original precision: ` model.layers.0.mlp.down_proj `." in card


def test_a_custom_recipes_names_and_generated_text_stay_text(tmp_path):
    # Given a custom recipe whose ignore list and a generation hold Markdown links and HTML
    recipe = (
        "quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      scheme: FP8_DYNAMIC\n"
        "      ignore: ['lm_head', '[click](https://evil.example)', '<img src=x onerror=alert(1)>', 'a`b']\n"
    )
    evaluation = {
        **EVALUATION,
        "generations": [
            {
                "prompt": "[p](https://evil.example)",
                "baseline": "<b>hi</b>",
                "compressed": "# not a heading\n![x](https://evil.example/x.png)",
            }
        ],
    }
    card = card_for(tmp_path, model_name="custom", preset=None, recipe_yaml=recipe, evaluation=evaluation)

    # Then each shows as code or escaped text, never as a link, an image or HTML
    assert "` [click](https://evil.example) `" in card and "` <img src=x onerror=alert(1)> `" in card
    assert "`` a`b ``" in card
    assert "**Prompt:** \\[p\\](https://evil.example)" in card and "> \\<b\\>hi\\</b\\>" in card
    assert "> \\# not a heading\\\n> \\!\\[x\\](https://evil.example/x.png)" in card
