"""Sign-in limits: failed password sign-ins are counted per account and per address in the shared cache.

The backend guards every password sign-in (the pages, the admin, the API's browsable login); the sign-in
page's form also says why it refuses. Token requests are not password sign-ins and are not counted here.
"""

from __future__ import annotations

import hashlib

from django.conf import settings
from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest

from jobs.ratelimit import Window


def login_windows(request: HttpRequest | None, username: str | None) -> list[Window]:
    """The failed-sign-in windows this attempt counts in: its account's and its address's."""
    account = hashlib.sha256((username or "").strip().lower().encode()).hexdigest()[:32]
    windows = [Window(name="login-account", subject=account, rate=settings.COMPRESSOR_LOGIN_FAILURE_RATE)]
    address = request.META.get("REMOTE_ADDR") if request is not None else None
    if address:
        rate = settings.COMPRESSOR_LOGIN_FAILURE_RATE_PER_ADDRESS
        windows.append(Window(name="login-address", subject=address, rate=rate))
    return windows


def login_wait_s(request: HttpRequest | None, username: str | None) -> int:
    """Seconds until this account and address may try again; 0 when they may now."""
    full = [window for window in login_windows(request, username) if window.count() >= window.limit]
    return max((window.seconds_left() for window in full), default=0)


class RateLimitedModelBackend(ModelBackend):
    """The usual username and password check, refused while the account or address has too many failures."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if login_wait_s(request, username):
            raise PermissionDenied("Too many failed sign-ins.")  # authenticate() stops: no other backend tries
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None and password is not None:
            for window in login_windows(request, username):
                window.hit()
        return user
