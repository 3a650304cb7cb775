"""Pushing a succeeded job's checkpoint and card to a hub repository with the user's own token.

The hub is the local server that speaks the hub's HTTP API (tests/hub_server.py), now also for create_repo,
the preupload, LFS batch, upload and verify calls and the NDJSON commit that huggingface_hub sends; the push
runs on a real Celery worker (the light queue) and the checkpoint comes from a real compression.
"""

from __future__ import annotations

import hashlib
import socket
import time
import uuid
from pathlib import Path

import pytest
from django.test import Client

from jobs import hub_tokens
from jobs.models import HubPush, HubToken, Job, JobLogLine
from jobs.services import job_log

FP8 = {"preset": "fp8-dynamic", "calibration": {"kind": "none"}, "force": True}


def _push(api, job_id: int, repo_id: str, **extra):
    return api.post(f"/api/v1/jobs/{job_id}/push/", {"repo_id": repo_id, **extra}, format="json")


def _set_token(api, token: str):
    response = api.put("/api/v1/hub-token/", {"token": token}, format="json")
    assert response.status_code == 200, response.content
    return response


def _page(user, url: str) -> bytes:
    client = Client()
    client.force_login(user)
    response = client.get(url)
    assert response.status_code == 200, (url, response.status_code)
    return response.content


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- through a real worker ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_checkpoint_is_pushed_with_its_card_and_bad_tokens_or_others_repos_fail_in_words(
    live_worker, api, user, hub, hub_repo_id, tiny_model_dir, wait_job, wait_for, tmp_path
):
    from huggingface_hub import hf_hub_download

    # Given a job that really compressed a tiny model from the (local) hub, and alice's token of that hub
    source = hub_repo_id("tiny")
    hub.add_folder(source, tiny_model_dir)
    response = api.post("/api/v1/jobs/", {**FP8, "model": source}, format="json")
    assert response.status_code == 201, response.content
    job = wait_job(response.json()["id"], "succeeded", "failed")
    assert job.status == "succeeded", job.error + "\n" + live_worker.log_tail()
    good = hub.add_user("alice-hub")
    stored = _set_token(api, good)

    # When she pushes it to a new private repository of hers
    repo_id = f"alice-hub/tiny-fp8-{uuid.uuid4().hex[:6]}"
    response = _push(api, job.pk, repo_id, private=True)
    assert response.status_code == 202, response.content
    push = wait_for(
        lambda: HubPush.objects.filter(pk=response.json()["id"], status__in=["succeeded", "failed"]).first(),
        timeout=120,
        what="the push to end on the light worker",
    )

    # Then it succeeded, and the hub's private repository holds every manifest file with its sha256, and the card
    assert push.status == "succeeded", push.error + "\n" + live_worker.log_tail()
    repo = hub.repos[repo_id]
    assert repo.private and repo.owner == "alice-hub" and push.commit_sha == repo.branches["main"]
    assert push.commit_url.endswith(f"/{repo_id}/commit/{push.commit_sha}")
    assert any(method == "PUT" and path.startswith("/lfs-upload/") for method, path in hub.requests)
    for entry in job.manifest["files"]:
        downloaded = hf_hub_download(repo_id, entry["path"], endpoint=hub.endpoint, token=good, cache_dir=tmp_path)
        assert _sha256(Path(downloaded)) == entry["sha256"], entry["path"]
    card = Path(hf_hub_download(repo_id, "README.md", endpoint=hub.endpoint, token=good, cache_dir=tmp_path))
    assert "README.md" in {entry["path"] for entry in job.manifest["files"]}
    assert card.read_text().startswith("---") and "fp8" in card.read_text().lower()
    assert set(repo.commits[push.commit_sha]) == {e["path"] for e in job.manifest["files"]} | {"manifest.json"}

    # ...and the job's page links the pushed commit
    page = _page(user, f"/jobs/{job.pk}/").decode()
    assert push.commit_url in page and repo_id in page

    # When she pushes again with a token the hub does not accept
    wrong = f"hf_{uuid.uuid4().hex}{uuid.uuid4().hex[:6]}"
    _set_token(api, wrong)
    response = _push(api, job.pk, f"alice-hub/again-{uuid.uuid4().hex[:6]}")
    assert response.status_code == 202, response.content
    refused = wait_for(
        lambda: HubPush.objects.filter(pk=response.json()["id"], status__in=["succeeded", "failed"]).first(),
        timeout=60,
        what="the push with a wrong token to end",
    )

    # Then it failed saying what to do about the token
    assert refused.status == "failed"
    assert "refused your token (401)" in refused.error and "Set a new one" in refused.error

    # When she pushes, with her good token, to a repository of someone else
    _set_token(api, good)
    theirs = hub.add_repo(f"someone-else/model-{uuid.uuid4().hex[:6]}", {})
    response = _push(api, job.pk, theirs.repo_id)
    forbidden = wait_for(
        lambda: HubPush.objects.filter(pk=response.json()["id"], status__in=["succeeded", "failed"]).first(),
        timeout=60,
        what="the push to someone else's repository to end",
    )

    # Then it failed naming the repository and the refusal, and their repository is as it was
    assert forbidden.status == "failed" and "refused to write" in forbidden.error and "(403)" in forbidden.error
    assert theirs.repo_id in forbidden.error and len(theirs.commits) == 1

    # And neither token is ever shown: not by the API, not in the pages, the job's log or the worker's log
    shown = [
        stored.content,
        api.get("/api/v1/hub-token/").content,
        api.get(f"/api/v1/jobs/{job.pk}/pushes/").content,
        api.get(f"/api/v1/jobs/{job.pk}/").content,
        api.get(f"/api/v1/jobs/{job.pk}/log/").getvalue(),
        _page(user, f"/jobs/{job.pk}/"),
        _page(user, "/hub-token/"),
        live_worker.log_path.read_bytes(),
    ]
    for token in (good, wrong):
        assert not any(token.encode() in text for text in shown)
    assert hub_tokens.hub_token_for(owner=user).hint.encode() in shown[1]
    log = "\n".join(JobLogLine.objects.filter(job=job).values_list("text", flat=True))
    assert f"Pushed to {repo_id}: commit {push.commit_sha[:12]}" in log and "refused your token (401)" in log


# --- the requests (no worker needed) ---------------------------------------------------------------------


@pytest.mark.django_db
def test_another_users_job_cannot_be_pushed(api_for, user, other_user, make_job, checkpoint):
    # Given alice's succeeded job, and bob with a hub token of his own
    job = make_job(user)
    checkpoint(job)
    bob = api_for(other_user)
    _set_token(bob, "hf_bobs-own-token-0123456789")

    # When bob asks to push it, or to see its pushes
    response = _push(bob, job.pk, "bob/stolen")

    # Then it does not exist for him, and nothing is queued
    assert response.status_code == 404
    assert bob.get(f"/api/v1/jobs/{job.pk}/pushes/").status_code == 404
    assert not HubPush.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["queued", "running", "failed", "cancelled"])
def test_a_job_that_has_not_succeeded_cannot_be_pushed(api, user, make_job, status):
    job = make_job(user, status=status)
    _set_token(api, "hf_alices-token-0123456789")

    response = _push(api, job.pk, "alice/model")

    assert response.status_code == 400, response.content
    assert f"Job {job.pk} is {status}; only a succeeded job" in response.json()["non_field_errors"][0]
    assert not HubPush.objects.exists()


@pytest.mark.django_db
def test_a_push_needs_a_token_and_a_repository_named_namespace_slash_name(api, user, make_job, checkpoint):
    job = make_job(user)
    checkpoint(job)

    no_token = _push(api, job.pk, "alice/model")
    _set_token(api, "hf_alices-token-0123456789")
    bad_name = _push(api, job.pk, "just-a-name")

    assert no_token.status_code == 400 and "Set your hub token first" in no_token.json()["token"][0]
    assert bad_name.status_code == 400 and "namespace/name" in bad_name.json()["repo_id"][0]
    assert not HubPush.objects.exists()


@pytest.mark.django_db
def test_the_token_is_stored_encrypted_and_only_its_hint_is_ever_shown(api, user, make_user):
    token = "hf_" + "Secret" * 6 + "wxyz"

    # When it is stored through the API
    response = _set_token(api, token)

    # Then the answer, the API, the page and the admin show "hf_…wxyz" and never the token
    assert response.json()["hint"] == "hf_…wxyz" and token not in response.content.decode()
    assert api.get("/api/v1/hub-token/").json()["hint"] == "hf_…wxyz"
    page = _page(user, "/hub-token/").decode()
    assert "hf_…wxyz" in page and token not in page
    record = HubToken.objects.get(owner=user)
    admin_page = _page(make_user(is_staff=True, is_superuser=True), f"/admin/jobs/hubtoken/{record.pk}/change/")
    assert b"hf_\xe2\x80\xa6wxyz" in admin_page and token.encode() not in admin_page
    # ...and what the database holds is ciphertext that the server's key reads back
    assert token not in record.encrypted_token and "Secret" not in record.encrypted_token
    assert hub_tokens.hub_token_reveal(record) == token

    # When it is deleted, it is gone
    assert api.delete("/api/v1/hub-token/").status_code == 204
    assert api.get("/api/v1/hub-token/").status_code == 404 and not HubToken.objects.exists()


@pytest.mark.django_db
def test_a_token_that_turns_up_in_a_job_log_line_shows_as_its_hint(user, make_job):
    job = make_job(user)
    token = "hf_" + "A1b2C3d4" * 4 + "9876"

    job_log.job_log_append(job_id=job.pk, lines=[("push", f"the hub said: bad header Bearer {token}")])

    assert JobLogLine.objects.get(job=job).text == "the hub said: bad header Bearer hf_…9876"


@pytest.mark.django_db
def test_the_page_offers_the_push_form_to_the_owner_of_a_succeeded_job(api, user, make_job, checkpoint):
    job = make_job(user)
    checkpoint(job)

    without_token = _page(user, f"/jobs/{job.pk}/").decode()
    _set_token(api, "hf_alices-token-0123456789")
    with_token = _page(user, f"/jobs/{job.pk}/").decode()

    assert "store your hub token" in without_token and 'id="push-job"' not in without_token
    assert 'id="push-job"' in with_token and "hf_…6789" in with_token
    assert Job.objects.get(pk=job.pk).status == "succeeded"


@pytest.mark.django_db
def test_a_hub_that_cannot_be_reached_ends_the_push_failed_saying_so(api, user, make_job, checkpoint, settings):
    from jobs.hub_push import hub_push_run

    # Given a hub address nothing answers at, and a queued push of a succeeded job
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        settings.COMPRESSOR_HUB_ENDPOINT = f"http://127.0.0.1:{probe.getsockname()[1]}"
    job = make_job(user)
    checkpoint(job)
    token = "hf_alices-token-0123456789"
    _set_token(api, token)
    queued = _push(api, job.pk, "alice/model").json()

    # When the push runs (what the light worker's task calls)
    started = time.perf_counter()
    push = hub_push_run(push_id=queued["id"])

    # Then it failed at once, naming the hub and what to do, and a second run of the message changes nothing
    assert time.perf_counter() - started < 10
    assert push.status == "failed" and push.endpoint == settings.COMPRESSOR_HUB_ENDPOINT
    assert f"The hub ({settings.COMPRESSOR_HUB_ENDPOINT}) could not be reached" in push.error
    assert "push again later" in push.error and token not in push.error
    assert hub_push_run(push_id=queued["id"]) is None
    log = list(JobLogLine.objects.filter(job=job).values_list("text", flat=True))
    assert log[-1] == f"Push to alice/model failed: {push.error}"


@pytest.mark.django_db
def test_a_push_whose_worker_died_is_ended_failed_once_past_its_time_limit(user, make_job, settings):
    from datetime import timedelta

    from django.utils import timezone

    from jobs.tasks import housekeeping

    # Given two running pushes: one claimed long ago (its worker died), one claimed just now
    settings.COMPRESSOR_HUB_PUSH_HARD_LIMIT_S = 3600
    job = make_job(user)
    running = {"job": job, "owner": user, "status": HubPush.Status.RUNNING}
    dead = HubPush.objects.create(repo_id="alice/old", started_at=timezone.now() - timedelta(hours=2), **running)
    alive = HubPush.objects.create(repo_id="alice/new", started_at=timezone.now(), **running)

    # When housekeeping runs
    housekeeping()

    # Then only the old one ended failed, saying what happened and what to do, in the job's log too
    dead.refresh_from_db(), alive.refresh_from_db()
    assert dead.status == "failed" and "stopped before the push ended" in dead.error and "push again" in dead.error
    assert alive.status == "running" and alive.error == ""
    log = list(JobLogLine.objects.filter(job=job).values_list("text", flat=True))
    assert log[-1] == f"Push to alice/old failed: {dead.error}"
