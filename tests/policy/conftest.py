"""Fixtures for the policy tests: clients signed in as a user, by token (API) or by session (pages)."""

from __future__ import annotations

import pytest

from tests.jobs.conftest import api_for  # noqa: F401 - the API client fixture, shared with tests/jobs


@pytest.fixture
def client_for():
    """A Django test client signed in as the user (a session, like a browser)."""
    from django.test import Client

    def make(user, **options) -> Client:
        client = Client(**options)
        client.force_login(user)
        return client

    return make
