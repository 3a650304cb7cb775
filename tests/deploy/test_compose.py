"""docker-compose.yml as a real compose implementation reads it (no container engine runs on these machines).

podman-compose resolves the file the way `docker compose config` does (variables and their required ones, the
x-app anchors, profiles, services' references to volumes), and the Compose specification's rules (compose-spec:
the compose_spec crate's validation) check what it resolved: a misspelt key or a wrong shape fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import compose_spec
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SECRETS = {"DJANGO_SECRET_KEY": "s" * 50, "POSTGRES_PASSWORD": "pg-password"}
APP_SERVICES = {"init", "web", "worker-gpu0", "worker-cpu", "worker-light"}


def _resolve(compose_file: Path = COMPOSE, *, profiles: tuple[str, ...] = (), env: dict | None = None):
    command = [str(Path(sys.executable).with_name("podman-compose")), "--dry-run", "-f", str(compose_file)]
    command += [f"--profile={profile}" for profile in profiles] + ["config"]
    # Only the variables given: nothing of this machine's environment leaks into the result.
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **(SECRETS if env is None else env)}
    return subprocess.run(command, capture_output=True, text=True, env=clean, cwd=compose_file.parent, timeout=120)


def resolved(*profiles: str, **env: str) -> dict:
    """The resolved file, after the specification's validation."""
    result = _resolve(profiles=profiles, env={**SECRETS, **env})
    assert result.returncode == 0, f"podman-compose config failed:\n{result.stderr[-3000:]}"
    compose_spec.PyCompose.from_yaml(result.stdout).validate()
    return yaml.safe_load(result.stdout)


def _queues(service: dict) -> set[str]:
    command = service["command"]
    return set(command[command.index("-Q") + 1].split(","))


def test_the_default_layout_is_web_databases_and_three_kinds_of_worker():
    services = resolved()["services"]
    assert set(services) == APP_SERVICES | {"postgres", "redis"}
    # every queue the service sends jobs to has a worker
    assert set().union(*(_queues(services[name]) for name in services if name.startswith("worker-"))) == {
        "gpu",
        "cpu",
        "light",
    }
    # one database, one broker and one data volume for all of them
    for name in APP_SERVICES:
        env = services[name]["environment"]
        assert env["DATABASE_URL"] == "postgres://compressor:pg-password@postgres:5432/compressor", name
        assert env["CELERY_BROKER_URL"] == "redis://redis:6379/0" and env["DJANGO_ENV"] == "production", name
        assert env["COMPRESSOR_STORAGE"] == "local", name
        assert any(volume.startswith("artifacts:") for volume in services[name]["volumes"]), name
    assert services["web"]["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_the_gpu_worker_owns_its_gpu_and_has_a_vllm_environment_of_its_own():
    worker = resolved()["services"]["worker-gpu0"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["device_ids"] == ["0"]
    assert worker["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert "WITH_VLLM=1" in worker["build"]["args"]  # compose normalises build args to NAME=value
    assert worker["environment"]["COMPRESSOR_VLLM_PYTHON"] == "/opt/vllm/bin/python"
    assert worker["command"][worker["command"].index("-c") + 1] == "1"  # one job at a time per worker


def test_the_multi_gpu_profile_adds_a_worker_that_owns_four_gpus():
    assert "worker-gpus" not in resolved()["services"]
    worker = resolved("multi-gpu")["services"]["worker-gpus"]
    device_ids = worker["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
    assert device_ids == ["4", "5", "6", "7"]
    assert worker["environment"]["CUDA_VISIBLE_DEVICES"] == ",".join(device_ids)
    assert _queues(worker) == {"gpu"}


def test_every_service_that_builds_an_image_tag_builds_it_with_the_same_arguments():
    # A tag built by two services with different arguments is whichever built last: the GPU image's must keep
    # vLLM whichever profile builds it.
    builds: dict[str, set] = {}
    for service in resolved("multi-gpu", "s3", COMPRESSOR_STORAGE="s3")["services"].values():
        if "build" in service:
            builds.setdefault(service["image"], set()).add(tuple(sorted(service["build"].get("args", []))))
    assert builds["llm-compression-service:gpu"] == {("WITH_VLLM=1",)}
    assert all(len(arguments) == 1 for arguments in builds.values()), builds


def test_the_s3_profile_adds_object_storage_that_the_service_points_at():
    assert not {"object-storage", "object-storage-bucket"} & set(resolved()["services"])
    services = resolved("s3", COMPRESSOR_STORAGE="s3", AWS_ACCESS_KEY_ID="key", AWS_SECRET_ACCESS_KEY="secret")[
        "services"
    ]
    storage = services["object-storage"]
    assert storage["environment"] == {"MINIO_ROOT_USER": "key", "MINIO_ROOT_PASSWORD": "secret"}
    assert services["object-storage-bucket"]["depends_on"]["object-storage"]["condition"] == "service_healthy"
    for name in APP_SERVICES:
        env = services[name]["environment"]
        assert env["COMPRESSOR_STORAGE"] == "s3", name
        assert env["COMPRESSOR_S3_ENDPOINT_URL"] == "http://object-storage:9000", name
        assert env["AWS_ACCESS_KEY_ID"] == "key", name


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_without_a_required_secret_compose_stops_and_names_it(missing):
    result = _resolve(env={name: value for name, value in SECRETS.items() if name != missing})
    assert result.returncode != 0
    assert f"required variable {missing} is missing a value" in result.stderr


def test_a_misspelt_key_in_the_file_is_caught(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:", "    health_check:", 1))
    result = _resolve(broken)
    assert result.returncode == 0  # podman-compose passes it through...
    with pytest.raises(ValueError, match="health_check"):  # ...the specification's rules do not
        compose_spec.PyCompose.from_yaml(result.stdout).validate()
