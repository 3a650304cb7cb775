"""docker-compose's object storage (the s3 profile) never runs on MinIO's default credentials: its container
refuses to start without AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, saying which, and the other profiles
need neither. The start script is run as compose resolves it (podman-compose), by a real shell."""

from __future__ import annotations

import subprocess

import pytest

from tests.deploy.test_compose import resolved


def _start(env: dict[str, str]) -> subprocess.CompletedProcess:
    storage = resolved("s3", COMPRESSOR_STORAGE="s3", **env)["services"]["object-storage"]
    entrypoint, command = storage["entrypoint"], storage["command"]
    variables = {"PATH": "/usr/bin:/bin", **storage["environment"]}
    return subprocess.run([*entrypoint, *command], env=variables, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    "env",
    [{}, {"AWS_ACCESS_KEY_ID": "key"}, {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "short"}],
    ids=["none", "no-secret", "short-secret"],
)
def test_object_storage_refuses_to_start_without_its_credentials(env):
    started = _start(env)

    assert started.returncode == 1
    assert "needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in started.stderr


def test_with_its_credentials_it_goes_on_to_minios_own_start():
    started = _start({"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "a-long-enough-secret"})

    # MinIO's entrypoint is in its image, not here: the script got as far as starting it
    assert "needs AWS_ACCESS_KEY_ID" not in started.stderr
    assert "/usr/bin/docker-entrypoint.sh" in started.stderr and started.returncode == 127
