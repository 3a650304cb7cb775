"""Hostile models: pickle weights and remote code that would write a canary file, and "model ids" that are
really paths. Each is refused at submission, and the canary never exists."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from jobs.models import Job

pytestmark = pytest.mark.django_db


class _WritesFile:
    """Unpickling this opens (creates) a file: what a hostile pytorch_model.bin would do, harmlessly."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def _pickle_only_model(folder: Path, canary: Path) -> Path:
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_WritesFile(canary)))
    return folder


def _remote_code_model(folder: Path, canary: Path) -> Path:
    (folder / "evil.py").write_text(f"open({str(canary)!r}, 'w').close()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_pickle_payload_is_real(tmp_path):
    # The control for the tests below: loading these weights would indeed write the file.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_WritesFile(control)))
    assert control.exists()


@pytest.mark.parametrize(("make_hostile", "reason"), [(_pickle_only_model, "pickle"), (_remote_code_model, "code")])
def test_a_hostile_model_folder_is_refused_and_runs_nothing(
    api, settings, tiny_model_copy, canary, make_hostile, reason
):
    from engine.errors import PreflightError
    from engine.preflight import preflight
    from engine.spec import CalibrationSpec, CompressionSpec

    # Given an operator who allows local model folders (but neither pickle nor remote code)
    settings.COMPRESSOR_ALLOW_LOCAL_PATHS = True
    model = make_hostile(tiny_model_copy, canary)

    # When it is submitted through the API, and checked by the engine as a worker would
    response = api.post("/api/v1/jobs/", {"preset": "fp8-dynamic", "model": str(model)}, format="json")
    with pytest.raises(PreflightError, match=reason):
        preflight(CompressionSpec(model=str(model), preset="fp8-dynamic", calibration=CalibrationSpec(kind="none")))

    # Then both refuse it naming the model, and the canary fixture finds no file
    assert response.status_code == 400 and reason in response.json()["model"][0], response.content
    assert not Job.objects.exists()


def test_model_ids_that_are_really_paths_are_refused(api, api_for, other_user, make_job, checkpoint, media_root):
    # Given bob's finished job, whose output folder holds a complete model (config.json and safetensors)
    bobs_output = checkpoint(make_job(other_user))
    shutil.copy(bobs_output / "model.safetensors", bobs_output / "extra.safetensors")

    for model in [
        "/srv/x",
        "../../x",
        "./var/models",
        "~/x",
        str(bobs_output),
        str(bobs_output.relative_to(media_root)),
        f"{media_root}/../{media_root.name}/{bobs_output.relative_to(media_root)}",
    ]:
        response = api.post("/api/v1/jobs/", {"preset": "fp8-dynamic", "model": model}, format="json")

        assert response.status_code == 400, (model, response.content)
        assert "Local model folders are disabled" in response.json()["model"][0], response.json()
    assert not Job.objects.filter(owner__username="alice").exists()
