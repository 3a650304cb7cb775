"""CSRF on every form: each POST form the pages show carries the token, and a POST without it is refused;
the API refuses session-authenticated writes without it too (token clients need none)."""

from __future__ import annotations

from html.parser import HTMLParser

from django.contrib.auth import get_user_model
from django.test import Client

from jobs.models import Job


class PostForms(HTMLParser):
    """The action of each <form method="post"> and whether it holds a csrfmiddlewaretoken input."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: dict[str, bool] = {}
        self._current: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        if tag == "form" and (attributes.get("method") or "").lower() == "post":
            self._current = attributes.get("action") or ""
            self.forms.setdefault(self._current, False)
        elif tag == "input" and self._current is not None and attributes.get("name") == "csrfmiddlewaretoken":
            self.forms[self._current] = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None


def post_forms(client: Client, path: str) -> dict[str, bool]:
    response = client.get(path)
    assert response.status_code == 200, path
    parser = PostForms()
    parser.feed(response.content.decode())
    return parser.forms


def test_every_form_carries_the_token_and_a_post_without_it_is_refused(db, make_job):
    alice = get_user_model().objects.create_user("alice", password="pw-for-tests")
    queued = make_job(alice)
    failed = make_job(alice, status=Job.Status.FAILED)
    signed_in = Client(enforce_csrf_checks=True)
    signed_in.force_login(alice)
    anonymous = Client(enforce_csrf_checks=True)

    # The forms on every page (signed in and out), the admin's sign-in included
    forms: dict[str, bool] = {}
    for path in ("/", "/jobs/new/", f"/jobs/{queued.pk}/", f"/jobs/{failed.pk}/", "/compare/"):
        forms |= post_forms(signed_in, path)
    for path in ("/accounts/login/", "/admin/login/"):
        forms |= post_forms(anonymous, path)
    expected = {
        "/accounts/login/",
        "/accounts/logout/",
        "/jobs/new/",
        f"/jobs/{queued.pk}/cancel/",
        f"/jobs/{failed.pk}/retry/",
        "/admin/login/",
    }
    assert expected <= set(forms), sorted(forms)
    assert all(forms.values()), {action: has for action, has in forms.items() if not has}

    # Each refuses a POST without the token, and nothing happens
    for action in forms:
        client = anonymous if "login" in action else signed_in
        refused = client.post(action, {"username": "alice", "password": "pw-for-tests"})
        assert refused.status_code == 403 and b"CSRF" in refused.content, action
    assert Job.objects.get(pk=queued.pk).status == Job.Status.QUEUED
    assert Job.objects.filter(retry_of=failed).count() == 0 and Job.objects.count() == 2

    # The API with a session (the browsable API, the pages' scripts) needs it as well
    session_api = Client(enforce_csrf_checks=True)
    session_api.force_login(alice)
    for path in (
        "/api/v1/jobs/",
        f"/api/v1/jobs/{queued.pk}/cancel/",
        "/api/v1/token/",
        "/api/v1/calibration-datasets/",
    ):
        refused = session_api.post(path, {})
        assert refused.status_code == 403 and "CSRF" in refused.json()["detail"], path
