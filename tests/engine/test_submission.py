"""The submission check through the local hub (tests/hub_server.py): metadata only, the commit pinned,
the hub's refusals in words naming the field, and a 1 B model judged from its header alone."""

from __future__ import annotations

import time

import pytest

from engine import hub as engine_hub
from engine.errors import PreflightError
from engine.spec import CalibrationSpec, CompressionSpec
from engine.submission import check_submission
from tests.hub_server import folder_blobs, llama_1b_files

NO_DATA = CalibrationSpec(kind="none")


def test_a_1b_hub_model_is_judged_from_its_header_without_downloading_it(hub, hub_repo_id):
    # Given a Llama-3.2-1B-shaped repository (2.5 GB of weights) on the hub
    repo_id = hub_repo_id("llama-1b")
    repo = hub.add_repo(repo_id, llama_1b_files())
    weights = repo.commits[repo.branches["main"]]["model.safetensors"].size

    # When a grouped preset is checked for it
    started = time.perf_counter()
    checked = check_submission(CompressionSpec(model=repo_id, preset="w4a16-gptq", allow_local_paths=False))
    elapsed = time.perf_counter() - started

    # Then the facts come from the header: its parameters and dtype, its size, the pinned commit
    assert checked.model.commit == repo.branches["main"]
    assert checked.model.num_parameters == 1_235_814_400 and checked.model.dtypes == {"BF16": 1_235_814_400}
    assert checked.model.weights_bytes == weights and checked.extra_ignore == []  # 2048 and 8192 divide by 128
    # ...without a byte of the weights read beyond the header's first 100 kB
    ranges = [
        path
        for method, path in hub.requests
        if method == "GET" and path.endswith(f"{repo_id}/resolve/{checked.model.commit}/model.safetensors")
    ]
    assert len(ranges) == 1, hub.requests
    assert elapsed < 1.0, f"the check took {elapsed:.2f} s"


def test_a_preset_the_header_shows_128_cannot_divide_runs_in_groups_of_64(hub, hub_repo_id, builtin_model):
    # Given the built-in model (hidden size 576, which 128 does not divide and 64 does) on the hub
    repo_id = hub_repo_id("smol")
    hub.add_folder(repo_id, builtin_model)

    # When W4A16 is checked for it
    checked = check_submission(CompressionSpec(model=repo_id, preset="w4a16-gptq"))

    # Then the header's shapes choose groups of 64, which the recorded recipe says, leaving no layer out
    assert "group_size: 64" in checked.recipe_yaml and checked.extra_ignore == []


@pytest.mark.parametrize(
    ("kind", "words"), [("gated", "is a gated model on the hub"), ("missing", "was not found on the hub")]
)
def test_a_gated_or_missing_hub_model_is_refused_in_plain_words(hub, hub_repo_id, kind, words):
    # Given a gated repository, or a name the hub does not know
    repo_id = hub_repo_id(kind)
    if kind == "gated":
        hub.add_repo(repo_id, llama_1b_files(), gated=True)

    # When it is checked
    with pytest.raises(PreflightError, match=words) as info:
        check_submission(CompressionSpec(model=repo_id, preset="fp8-dynamic", calibration=NO_DATA))

    # Then the refusal names the model field
    assert info.value.field == "model" and repo_id in str(info.value)


def test_an_unknown_revision_is_refused_on_the_revision_field(hub, hub_repo_id, tiny_model_dir):
    repo_id = hub_repo_id("tiny")
    hub.add_folder(repo_id, tiny_model_dir)
    with pytest.raises(PreflightError, match="has no revision 'v9'") as info:
        check_submission(CompressionSpec(model=repo_id, revision="v9", preset="fp8-dynamic", calibration=NO_DATA))
    assert info.value.field == "revision"


def test_the_download_reports_bytes_and_fetches_the_pinned_commit(hub, hub_repo_id, tiny_model_dir, builtin_model):
    # Given a repository whose main branch moves to another model after the commit was pinned
    repo_id = hub_repo_id("moving")
    repo = hub.add_folder(repo_id, tiny_model_dir)
    pinned = check_submission(CompressionSpec(model=repo_id, preset="fp8-dynamic", calibration=NO_DATA)).model.commit
    repo.commit(folder_blobs(builtin_model))

    # When the pinned commit is downloaded
    seen: list[tuple[int, int, str]] = []
    folder = engine_hub.download(repo_id, pinned, allow_pickle=False, progress=lambda *event: seen.append(event))

    # Then the snapshot is that commit's (the tiny model), and the bytes counted up to the total
    assert folder.name == pinned
    expected = sum(f.stat().st_size for f in tiny_model_dir.iterdir() if f.is_file())
    assert (folder / "model.safetensors").stat().st_size == (tiny_model_dir / "model.safetensors").stat().st_size
    assert seen[-1][:2] == (expected, expected)
    assert [done for done, _total, _file in seen] == sorted(done for done, _total, _file in seen)


def test_a_custom_grouped_recipe_is_judged_from_the_header_as_a_preset_is(builtin_model):
    # Given a custom GPTQ W4A16 recipe (groups of 128) for the built-in model (hidden size 576)
    recipe = "quant_stage:\n  quant_modifiers:\n    GPTQModifier: {scheme: W4A16, targets: [Linear]}\n"

    # When it is checked, then the header's shapes refuse it before any worker would load the model, saying
    # what to write in the recipe (a custom recipe is never rewritten)
    with pytest.raises(
        PreflightError, match=r"Group size 128 does not divide the input width \(576\) of 180 layers"
    ) as info:
        check_submission(CompressionSpec(recipe_yaml=recipe, calibration=CalibrationSpec(samples=8)))
    assert "groups of 64" in str(info.value) and info.value.field == "recipe"
