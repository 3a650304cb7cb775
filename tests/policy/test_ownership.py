"""Each user sees, cancels, retries and downloads only their own jobs, logs, artifacts and datasets.

One parametrised test walks every route the project's URL resolver knows and requests it as another user
(bob) who is not staff: another user's object answers 404, lists and pages never show it, and actions change
nothing. A route added without a case here fails the test until someone says how it keeps others out.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from django.contrib.auth import get_user_model
from django.core.files.base import ContentFile
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from jobs import hub_tokens
from jobs.models import CalibrationDataset, HubPush, Job, JobLogLine

SECRET = "alice-secret-7f3a"  # in alice's model name, dataset name and log: never in a page bob gets


def routes() -> list[str]:
    """Every route as "namespace:name" (the admin as one: its views are all behind the staff sign-in)."""
    found: list[str] = []

    def walk(patterns, namespace: str | None) -> None:
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                if pattern.namespace == "admin":
                    found.append("admin")
                else:
                    walk(pattern.url_patterns, pattern.namespace or namespace)
            elif isinstance(pattern, URLPattern):
                found.append(f"{namespace}:{pattern.name}" if namespace else str(pattern.name))

    walk(get_resolver().url_patterns, None)
    return sorted(set(found))


@dataclass
class World:
    alice: object
    succeeded: Job
    failed: Job
    queued: Job
    dataset: CalibrationDataset
    alice_token: str
    bob_api: APIClient
    bob_page: Client


@pytest.fixture
def world(db, media_root) -> World:
    users = get_user_model().objects
    alice, bob = users.create(username="alice"), users.create(username="bob")
    model = f"{SECRET}/model"

    def job(**fields) -> Job:
        return Job.objects.create(owner=alice, model_source=model, preset="fp8-dynamic", queue="gpu", **fields)

    succeeded = job(status=Job.Status.SUCCEEDED, results={"size_after_bytes": 10})
    folder = media_root / succeeded.artifacts_relpath()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(os.urandom(1000))
    from engine.artifacts import write_manifest

    succeeded.artifacts_path, succeeded.manifest = succeeded.artifacts_relpath(), write_manifest(folder)
    succeeded.save()
    failed, queued = job(status=Job.Status.FAILED), job(status=Job.Status.QUEUED)
    JobLogLine.objects.create(job=failed, text=f"{SECRET} log line")
    dataset = CalibrationDataset(owner=alice, name=f"{SECRET}-rows", sha256="0" * 64)
    dataset.file.save("rows.jsonl", ContentFile(b'{"text": "alice-only"}\n'))
    bob_api = APIClient()
    bob_api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=bob).key}")
    bob_page = Client()
    bob_page.force_login(bob)
    return World(alice, succeeded, failed, queued, dataset, Token.objects.create(user=alice).key, bob_api, bob_page)


# --- what bob may get from each kind of route -------------------------------------------------------------

Case = Callable[[World], None]


def not_found(method: str, url: Callable[[World], str], *, api: bool = True) -> Case:
    """Another user's object: 404, the same as one that does not exist; and nothing changes."""

    def check(w: World) -> None:
        client = w.bob_api if api else w.bob_page
        response = getattr(client, method)(url(w))
        assert response.status_code == 404, (url(w), response.status_code)
        assert SECRET.encode() not in response.content
        assert Job.objects.get(pk=w.queued.pk).status == Job.Status.QUEUED  # not cancelled
        assert Job.objects.count() == 3  # nothing retried or cloned

    return check


def never_shows(url: Callable[[World], str], *, api: bool = False) -> Case:
    """A list or a page of one's own: answers, and nothing of alice's is in it."""

    def check(w: World) -> None:
        response = (w.bob_api if api else w.bob_page).get(url(w))
        assert response.status_code in (200, 302), (url(w), response.status_code)
        assert SECRET.encode() not in response.content, url(w)
        for job in (w.succeeded, w.failed, w.queued):
            assert f"/jobs/{job.pk}/".encode() not in response.content, url(w)

    return check


def own_token_only(w: World) -> None:
    """Rotating and revoking act on bob's own token: alice's keeps working."""
    assert w.bob_api.post("/api/v1/token/").status_code == 200
    assert w.bob_page.delete("/api/v1/token/").status_code in (204, 403)  # a session needs its CSRF token
    alice = APIClient()
    alice.credentials(HTTP_AUTHORIZATION=f"Token {w.alice_token}")
    assert alice.get(f"/api/v1/jobs/{w.succeeded.pk}/").status_code == 200


def own_hub_token_only(w: World) -> None:
    """Reading, replacing and deleting a hub token act on bob's own: alice's stays, and is never shown to him."""
    alice_token = f"hf_{SECRET}-0123456789"
    hub_tokens.hub_token_set(owner=w.alice, token=alice_token)
    assert w.bob_api.get("/api/v1/hub-token/").status_code == 404
    assert w.bob_api.put("/api/v1/hub-token/", {"token": "hf_bobs-own-token-0123"}, format="json").status_code == 200
    assert w.bob_api.delete("/api/v1/hub-token/").status_code == 204
    page = w.bob_page.get("/hub-token/")
    assert page.status_code == 200 and SECRET.encode() not in page.content and b"6789" not in page.content
    assert hub_tokens.hub_token_reveal(hub_tokens.hub_token_for(owner=w.alice)) == alice_token


def own_api_token_page(w: World) -> None:
    """The API token page shows bob's own token, never alice's (nor its last characters)."""
    page = w.bob_page.get("/api-token/")
    assert page.status_code == 200 and w.alice_token[-4:].encode() not in page.content


def own_uploads_only(w: World) -> None:
    """The calibration files page lists bob's uploads alone; deleting alice's (page or API) finds nothing."""
    page = w.bob_page.get("/calibration-files/")
    assert page.status_code == 200 and f'value="{w.dataset.pk}"'.encode() not in page.content
    assert w.bob_page.post("/calibration-files/", {"delete": w.dataset.pk}).status_code == 404
    assert w.bob_api.delete(f"/api/v1/calibration-datasets/{w.dataset.pk}/").status_code == 404
    assert type(w.dataset).objects.filter(pk=w.dataset.pk).exists()


def no_push(method: str, url: Callable[[World], str], *, api: bool = True) -> Case:
    """Pushing alice's job or reading its pushes: 404, and nothing is queued."""
    check_404 = not_found(method, url, api=api)

    def check(w: World) -> None:
        check_404(w)
        assert not HubPush.objects.exists()

    return check


def staff_only(w: World) -> None:
    """The admin: every page sends a user who is not staff to the admin's sign-in."""
    job, dataset = w.succeeded.pk, w.dataset.pk
    for url in (
        "/admin/",
        "/admin/jobs/job/",
        f"/admin/jobs/job/{job}/change/",
        "/admin/jobs/job/queue/",
        "/admin/jobs/calibrationdataset/",
        f"/admin/jobs/calibrationdataset/{dataset}/change/",
        "/admin/authtoken/tokenproxy/",
        "/admin/jobs/hubtoken/",
        "/admin/jobs/hubpush/",
    ):
        response = w.bob_page.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/"), url


def no_user_data(url: str, *, api: bool = False) -> Case:
    """Routes about no one's objects (sign-in, schema, presets): whatever they answer holds nothing of alice's."""

    def check(w: World) -> None:
        response = (w.bob_api if api else w.bob_page).get(url)
        assert response.status_code < 500, (url, response.status_code)
        assert SECRET.encode() not in response.content, url

    return check


CASES: dict[str, Case] = {
    # The API: alice's jobs and datasets do not exist for bob.
    "api:job-detail": not_found("get", lambda w: f"/api/v1/jobs/{w.succeeded.pk}/"),
    "api:job-logs": not_found("get", lambda w: f"/api/v1/jobs/{w.failed.pk}/logs/"),
    "api:job-log": not_found("get", lambda w: f"/api/v1/jobs/{w.failed.pk}/log/"),
    "api:job-results": not_found("get", lambda w: f"/api/v1/jobs/{w.succeeded.pk}/results/"),
    "api:job-archive": not_found("get", lambda w: f"/api/v1/jobs/{w.succeeded.pk}/archive/"),
    "api:job-manifest": not_found("get", lambda w: f"/api/v1/jobs/{w.succeeded.pk}/manifest/"),
    "api:job-file": not_found("get", lambda w: f"/api/v1/jobs/{w.succeeded.pk}/files/model.safetensors"),
    "api:job-cancel": not_found("post", lambda w: f"/api/v1/jobs/{w.queued.pk}/cancel/"),
    "api:job-retry": not_found("post", lambda w: f"/api/v1/jobs/{w.failed.pk}/retry/"),
    "api:calibration-dataset-detail": not_found("get", lambda w: f"/api/v1/calibration-datasets/{w.dataset.pk}/"),
    "api:job-list": never_shows(lambda w: "/api/v1/jobs/?status=succeeded", api=True),
    "api:calibration-dataset-list": never_shows(lambda w: "/api/v1/calibration-datasets/", api=True),
    "api:preset-list": no_user_data("/api/v1/presets/", api=True),
    "api:api-root": no_user_data("/api/v1/", api=True),
    "api:token": own_token_only,
    "api:hub-token": own_hub_token_only,
    "api:job-push": no_push("post", lambda w: f"/api/v1/jobs/{w.succeeded.pk}/push/"),
    "api:job-pushes": no_push("get", lambda w: f"/api/v1/jobs/{w.succeeded.pk}/pushes/"),
    "schema": no_user_data("/api/v1/schema/"),
    "api-docs": no_user_data("/api/v1/docs/"),
    "rest_framework:login": no_user_data("/api/v1/auth/login/"),
    "rest_framework:logout": no_user_data("/api/v1/auth/logout/"),
    # The pages.
    "frontend:job-detail": not_found("get", lambda w: f"/jobs/{w.succeeded.pk}/", api=False),
    "frontend:job-live": not_found("get", lambda w: f"/jobs/{w.queued.pk}/live/", api=False),
    "frontend:job-log": not_found("get", lambda w: f"/jobs/{w.failed.pk}/log.txt", api=False),
    "frontend:job-checksums": not_found("get", lambda w: f"/jobs/{w.succeeded.pk}/SHA256SUMS", api=False),
    "frontend:job-cancel": not_found("post", lambda w: f"/jobs/{w.queued.pk}/cancel/", api=False),
    "frontend:job-retry": not_found("post", lambda w: f"/jobs/{w.failed.pk}/retry/", api=False),
    "frontend:job-delete": not_found("post", lambda w: f"/jobs/{w.failed.pk}/delete/", api=False),
    "frontend:job-push": no_push("post", lambda w: f"/jobs/{w.succeeded.pk}/push/", api=False),
    "frontend:hub-token": own_hub_token_only,
    "frontend:job-new": not_found("get", lambda w: f"/jobs/new/?from={w.succeeded.pk}", api=False),
    "frontend:job-list": never_shows(lambda w: "/"),
    "frontend:job-rows": never_shows(lambda w: "/jobs/rows/?status=queued"),
    "frontend:compare": never_shows(lambda w: f"/compare/?model={SECRET}/model&jobs={w.succeeded.pk}"),
    "frontend:api-token": own_api_token_page,
    "frontend:calibration-files": own_uploads_only,
    "frontend:favicon": no_user_data("/favicon.ico"),
    "admin": staff_only,
    # Signing in and out, and the password pages: about the signed-in user alone.
    "login": no_user_data("/accounts/login/"),
    "logout": no_user_data("/accounts/logout/"),
    "password_change": no_user_data("/accounts/password_change/"),
    "password_change_done": no_user_data("/accounts/password_change/done/"),
    "password_reset": no_user_data("/accounts/password_reset/"),
    "password_reset_done": no_user_data("/accounts/password_reset/done/"),
    "password_reset_confirm": no_user_data("/accounts/reset/MQ/set-password/"),
    "password_reset_complete": no_user_data("/accounts/reset/done/"),
}


@pytest.mark.parametrize("route", routes())
def test_another_users_objects_do_not_exist_for_you(route: str, world: World):
    case = CASES.get(route)
    assert case is not None, f"The route {route!r} has no case here: say how another user is kept out of it."
    case(world)
