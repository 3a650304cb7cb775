"""A user's hub token: stored encrypted with Fernet, written through these functions, never shown again.

The key: settings.COMPRESSOR_ENCRYPTION_KEY (Fernet keys; the first encrypts, each decrypts, so a new key put
first rotates without losing what the old one wrote), or, when unset, a key derived from SECRET_KEY with
HKDF-SHA256. Pages, the API, the admin and logs get only the hint ("hf_…abcd"); only the worker that pushes
decrypts the token, for the one request session it hands to huggingface_hub.
"""

from __future__ import annotations

import base64
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser

from engine.errors import EngineError
from jobs.models import HubToken
from jobs.redaction import token_hint

MIN_TOKEN_CHARS = 12  # the hint shows 4 characters: on a shorter "token" that would give much of it away
MAX_TOKEN_CHARS = 500


class UnreadableToken(Exception):
    """The stored token cannot be decrypted with the server's keys (the key or SECRET_KEY changed)."""


@lru_cache(maxsize=4)
def _cipher(keys: tuple[str, ...], secret_key: str) -> MultiFernet:
    if not keys:
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"compressor hub tokens").derive(
            secret_key.encode()
        )
        keys = (base64.urlsafe_b64encode(derived).decode(),)
    return MultiFernet([Fernet(key.encode()) for key in keys])


def cipher() -> MultiFernet:
    """The server's Fernet keys (cached per settings, so tests that override them get theirs)."""
    return _cipher(tuple(settings.COMPRESSOR_ENCRYPTION_KEY), settings.SECRET_KEY)


def hub_endpoint(token: HubToken | None) -> str:
    """The hub a push goes to: the token's own (one the operator allows) or COMPRESSOR_HUB_ENDPOINT."""
    return ((token.endpoint if token else "") or settings.COMPRESSOR_HUB_ENDPOINT).rstrip("/")


def hub_token_set(*, owner: AbstractBaseUser, token: str, endpoint: str = "") -> HubToken:
    """Store (or replace) the owner's hub token, encrypted. Raises EngineError naming the field."""
    token = token.strip()
    printable = all("!" <= char <= "~" for char in token)  # an HTTP header's visible ASCII, as hubs issue them
    if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS or not printable:
        raise EngineError(
            f"A hub token is {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} letters, digits or signs without spaces "
            "(hub settings, Access Tokens: a token with write access).",
            field="token",
        )
    endpoint = endpoint.strip().rstrip("/")
    allowed = [allowed.rstrip("/") for allowed in settings.COMPRESSOR_HUB_ENDPOINTS]
    if endpoint and endpoint not in allowed:
        raise EngineError(f"This server pushes only to {', '.join(allowed)}.", field="endpoint")
    record, _created = HubToken.objects.update_or_create(
        owner=owner,
        defaults={
            "encrypted_token": cipher().encrypt(token.encode()).decode(),
            "hint": token_hint(token),
            "endpoint": "" if endpoint == settings.COMPRESSOR_HUB_ENDPOINT.rstrip("/") else endpoint,
        },
    )
    return record


def hub_token_delete(*, owner: AbstractBaseUser) -> bool:
    """Forget the owner's hub token; False when there was none."""
    deleted, _ = HubToken.objects.filter(owner=owner).delete()
    return bool(deleted)


def hub_token_for(*, owner: AbstractBaseUser) -> HubToken | None:
    return HubToken.objects.filter(owner=owner).first()


def hub_token_reveal(record: HubToken) -> str:
    """The token itself, for the push that sends it to the hub (and for nothing else)."""
    try:
        return cipher().decrypt(record.encrypted_token.encode()).decode()
    except InvalidToken:
        raise UnreadableToken(
            "Your hub token can no longer be read (the server's encryption key changed); set it again."
        ) from None
