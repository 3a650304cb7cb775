"""Headers on every answer: a Content-Security-Policy, and no caching of what a signed-in user or a token sees."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.utils.cache import patch_cache_control

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        # No inline script anywhere: the pages load app.js, the admin its files, the API docs their own
        # initialisation as a file (SpectacularSwaggerSplitView).
        "script-src 'self'",
        # Progress bars and charts size themselves with style attributes (a style cannot run code).
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",  # the API docs' icons are data: URLs
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


class SecurityHeaders:
    """Content-Security-Policy on every answer; `Cache-Control: private, no-store` on the API's answers and on
    every page a signed-in user gets (job pages, logs, tokens), so no shared or browser cache keeps them."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        # A token request's user is DRF's, not Django's request.user: the API is matched by its path.
        user = getattr(request, "user", None)
        if request.path.startswith("/api/") or (user is not None and user.is_authenticated):
            patch_cache_control(response, private=True, no_store=True)
        return response
