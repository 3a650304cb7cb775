"""A user's API token: a new one (the old one stops working at once), or none."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction


def token_rotate(*, user: AbstractBaseUser) -> str:
    """A new API token for the user; the old one stops working at once. Returns the new key."""
    from rest_framework.authtoken.models import Token

    with transaction.atomic():
        Token.objects.filter(user=user).delete()
        return Token.objects.create(user=user).key


def token_revoke(*, user: AbstractBaseUser) -> bool:
    """Delete the user's API token (programs using it get 401); False if there was none."""
    from rest_framework.authtoken.models import Token

    deleted, _ = Token.objects.filter(user=user).delete()
    return bool(deleted)
