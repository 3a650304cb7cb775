"""The model families users bring (tests/families.py: tiny random models from their transformers configs, laid
out as hub repositories), through the submission check on the local hub: what each family's preset leaves out,
from the safetensors header alone. tests/jobs/test_families_service.py runs one job per family through the
service, with the vLLM check."""

from __future__ import annotations

import os
from pathlib import Path

from engine.spec import CalibrationSpec, CompressionSpec
from engine.submission import check_submission
from tests.families import FAMILIES, KEPT_IN_BF16, add_family_repos, built_families

FEW = CalibrationSpec(samples=8, max_seq_len=64)
DATA_DIR = Path(os.environ.get("COMPRESSOR_DATA_DIR") or Path(__file__).resolve().parents[2] / "var")


def test_each_family_is_judged_from_its_hub_header(hub, builtin_model):
    # Given every family served by the local hub as sharded safetensors with an index
    family_models = built_families(builtin_model, DATA_DIR)
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
