"""Fixtures for the policy tests: clients signed in as a user, by token (API) or by session (pages)."""

from __future__ import annotations

import pytest


@pytest.fixture
def api_for():
    """An API client authenticated as the user with a real token (TokenAuthentication)."""
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    def client(user) -> APIClient:
        api = APIClient()
        token, _ = Token.objects.get_or_create(user=user)
        api.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
        return api

    return client


@pytest.fixture
def client_for():
    """A Django test client signed in as the user (a session, like a browser)."""
    from django.test import Client

    def make(user, **options) -> Client:
        client = Client(**options)
        client.force_login(user)
        return client

    return make
