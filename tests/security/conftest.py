"""Fixtures for the attacker's-eye tests: the jobs tests' users, token clients and checkpoints, and no hub."""

from __future__ import annotations

import pytest

from tests.frontend.conftest import browser, new_page, sign_in, succeeded_job  # noqa: F401 - fixtures (the pages)
from tests.jobs.conftest import api, api_for, checkpoint, other_user, user  # noqa: F401 - fixtures


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """As on a server that cannot reach the Hugging Face hub: answers come at once, and nothing is downloaded."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def no_creation_throttle(settings):
    """These tests send many refused submissions as the same few users; the throttle has its own tests."""
    settings.COMPRESSOR_JOB_CREATE_RATE = "100000/hour"


@pytest.fixture
def canary(tmp_path):
    """A file that hostile input tries to create; a test fails if it ever exists."""
    path = tmp_path / "canary"
    yield path
    assert not path.exists(), "hostile input ran code: the canary file exists"
