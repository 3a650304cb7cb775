"""The REST API without a worker: validation, visibility, throttling, uploads, presets, schema and docs."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from jobs.inputs import job_spec
from jobs.models import Job

pytestmark = pytest.mark.django_db


def test_requests_without_credentials_are_refused(client):
    from rest_framework.test import APIClient

    assert APIClient().get("/api/v1/jobs/").status_code in (401, 403)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"preset": "no-such-preset"}, "preset"),
        ({"preset": "fp8-dynamic", "recipe_yaml": "a: b"}, "preset"),
        ({"recipe_yaml": "just: [a, list"}, "recipe_yaml"),
        ({"preset": "int8-w8a8-gptq", "calibration": {"kind": "none"}}, "calibration"),
        ({"preset": "int8-w8a8-gptq", "calibration": {"samples": 0}}, "calibration"),
        ({"preset": "fp8-dynamic", "priority": 12}, "priority"),
        ({"preset": "fp8-dynamic", "model": "/etc"}, "model"),
        ({"preset": "int8-w8a8-gptq", "calibration": {"kind": "upload", "dataset_id": 999}}, "calibration"),
        ({"preset": "fp8-dynamic", "gpus": 0}, "gpus"),
        ({"preset": "fp8-dynamic", "gpus": 16}, "gpus"),
        ({"preset": "fp8-dynamic", "gpus": 2, "device_class": "cpu"}, "gpus"),
        # the built-in model's 9 attention heads cannot be split over 2 GPUs by vLLM's tensor parallelism
        ({"preset": "fp8-dynamic", "gpus": 2}, "gpus"),
    ],
)
def test_a_bad_request_gets_400_naming_the_field(api, body, field):
    response = api.post("/api/v1/jobs/", body, format="json")

    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert not Job.objects.exists()


def test_a_job_asks_for_a_number_of_gpus_or_for_as_many_as_the_plan_needs(api):
    asked = api.post("/api/v1/jobs/", {"preset": "fp8-dynamic", "gpus": 3}, format="json")
    assert asked.status_code == 201, asked.content
    assert asked.json()["gpus"] == 3 and job_spec(Job.objects.get(pk=asked.json()["id"])).gpus == 3
    planned = api.post("/api/v1/jobs/", {"preset": "fp8-dynamic", "force": True}, format="json")
    assert planned.status_code == 201 and planned.json()["gpus"] is None


def test_users_cannot_ask_for_more_than_normal_priority_but_staff_can(api, api_for, make_user):
    assert api.post("/api/v1/jobs/", {"preset": "fp8-dynamic", "priority": 9}, format="json").status_code == 400
    staff = api_for(make_user("op", is_staff=True))
    assert staff.post("/api/v1/jobs/", {"preset": "fp8-dynamic", "priority": 9}, format="json").status_code == 201


def test_another_user_gets_404_on_someone_elses_job(api_for, user, other_user, make_user, make_job, checkpoint):
    # Given alice's succeeded job
    job = make_job(user)
    checkpoint(job)
    bob = api_for(other_user)

    # Then bob can neither see, follow, change nor download it
    for method, url in [
        ("get", f"/api/v1/jobs/{job.pk}/"),
        ("get", f"/api/v1/jobs/{job.pk}/logs/"),
        ("get", f"/api/v1/jobs/{job.pk}/results/"),
        ("get", f"/api/v1/jobs/{job.pk}/archive/"),
        ("get", f"/api/v1/jobs/{job.pk}/manifest/"),
        ("get", f"/api/v1/jobs/{job.pk}/files/config.json"),
        ("post", f"/api/v1/jobs/{job.pk}/cancel/"),
        ("post", f"/api/v1/jobs/{job.pk}/retry/"),
    ]:
        assert getattr(bob, method)(url).status_code == 404, url
    assert bob.get("/api/v1/jobs/").json()["count"] == 0
    # ...while alice and staff can
    assert api_for(user).get(f"/api/v1/jobs/{job.pk}/").status_code == 200
    assert api_for(make_user("op", is_staff=True)).get(f"/api/v1/jobs/{job.pk}/manifest/").status_code == 200


def test_owners_delete_their_ended_jobs_with_their_files_through_the_api(
    api_for, user, other_user, make_user, make_job, checkpoint, media_root, django_capture_on_commit_callbacks
):
    # Given alice's succeeded job with its checkpoint, and a queued one
    job, queued = make_job(user), make_job(user, status="queued")
    checkpoint(job)
    folder = Path(media_root) / job.artifacts_relpath()

    # Then neither bob nor staff may delete it, and a queued job is refused with the reason
    assert api_for(other_user).delete(f"/api/v1/jobs/{job.pk}/").status_code == 404
    assert api_for(make_user("op", is_staff=True)).delete(f"/api/v1/jobs/{job.pk}/").status_code == 404
    refused = api_for(user).delete(f"/api/v1/jobs/{queued.pk}/")
    assert refused.status_code == 409 and "cancel it" in refused.json()["detail"]

    # When alice deletes it, then the job and its files are gone
    with django_capture_on_commit_callbacks(execute=True):
        assert api_for(user).delete(f"/api/v1/jobs/{job.pk}/").status_code == 204
    assert not Job.objects.filter(pk=job.pk).exists() and not folder.exists()
    assert Job.objects.filter(pk=queued.pk, status="queued").exists()


def test_list_is_paginated_and_filtered_by_status(api, user, make_job):
    make_job(user, status=Job.Status.FAILED)
    make_job(user, status=Job.Status.QUEUED)

    everything = api.get("/api/v1/jobs/").json()
    failed = api.get("/api/v1/jobs/", {"status": "failed"}).json()

    assert everything["count"] == 2 and "results" in everything and "next" in everything
    assert [j["status"] for j in failed["results"]] == ["failed"]
    assert api.get("/api/v1/jobs/", {"status": "bogus"}).status_code == 400


def test_a_page_that_is_no_number_is_a_400_naming_the_page(api, user, make_job):
    make_job(user)
    for url in ("/api/v1/jobs/?page=", "/api/v1/jobs/?page=x", "/api/v1/calibration-datasets/?page="):
        response = api.get(url)
        assert response.status_code == 400 and "page" in response.json(), url
    assert api.get("/api/v1/jobs/?page=1").json()["count"] == 1
    assert api.get("/api/v1/jobs/?page=last").status_code == 200


def test_create_returns_the_job_with_its_queue_position(api, user, make_job):
    make_job(user, priority=5)  # already waiting
    response = api.post("/api/v1/jobs/", {"preset": "fp8-dynamic", "calibration": {"kind": "none"}}, format="json")

    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "queued" and body["queue_position"] == 2 and body["duplicate"] is False
    assert body["owner"] == "alice" and body["links"]["page"] == f"/jobs/{body['id']}/"


def test_a_succeeded_jobs_links_are_the_apis_own_addresses_and_each_answers(api, user, make_job, checkpoint):
    from django.urls import reverse

    job = make_job(user)
    checkpoint(job)
    links = api.get(f"/api/v1/jobs/{job.pk}/").json()["links"]

    for name in ("detail", "logs", "archive", "manifest", "results"):
        link = links["self" if name == "detail" else name]
        assert link == f"http://testserver{reverse(f'api:job-{name}', kwargs={'pk': job.pk})}"
        assert api.get(link).status_code == 200, link
    assert api.get(links["files"].format(path="config.json")).status_code == 200
    assert links["page"] == f"/jobs/{job.pk}/" and len(links) == 7


def test_status_and_results_are_read_only(api, user, make_job):
    job = make_job(user)
    assert api.patch(f"/api/v1/jobs/{job.pk}/", {"status": "succeeded"}, format="json").status_code == 405
    assert api.get(f"/api/v1/jobs/{job.pk}/results/").status_code == 409  # not succeeded yet


def test_job_creation_is_throttled(api, settings):
    settings.COMPRESSOR_JOB_CREATE_RATE = "2/minute"
    codes = [
        api.post("/api/v1/jobs/", {"preset": "fp8-dynamic", "force": True}, format="json").status_code for _ in range(3)
    ]
    assert codes == [201, 201, 429]
    assert api.get("/api/v1/jobs/").status_code == 200  # reading is not throttled


def test_the_domains_errors_are_answered_alike_by_every_view(api, user, make_job, settings):
    # Given a rate of one job an hour, already used, a queued job and a cancelled one
    settings.COMPRESSOR_JOB_CREATE_RATE = "1/hour"
    assert api.post("/api/v1/jobs/", {"preset": "fp8-dynamic", "force": True}, format="json").status_code == 201
    queued = make_job(user)
    cancelled = make_job(user, status=Job.Status.CANCELLED)

    # When each view meets a refusal of the services
    created = api.post("/api/v1/jobs/", {"preset": "fp8-dynamic", "force": True}, format="json")
    retried = api.post(f"/api/v1/jobs/{cancelled.pk}/retry/")
    not_retriable = api.post(f"/api/v1/jobs/{queued.pk}/retry/")
    not_pushable = api.post(f"/api/v1/jobs/{queued.pk}/push/", {"repo_id": "me/model"}, format="json")
    not_downloadable = api.get(f"/api/v1/jobs/{queued.pk}/manifest/")

    # Then a limit is a 429 whose one sentence states the wait once, with Retry-After
    for refused in (created, retried):
        detail = refused.json()["detail"]
        assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
        assert detail.count("try again in") == 1 and "Expected available" not in detail, detail
        assert detail.count(". ") == 0 and detail.endswith("."), detail
    # a state that does not allow it a 409, a refused push a 400 and a missing checkpoint a 409, each with its reason
    assert not_retriable.status_code == 409 and "only failed or cancelled jobs" in not_retriable.json()["detail"]
    assert not_pushable.status_code == 400 and "only a succeeded job" in not_pushable.json()["non_field_errors"][0]
    assert not_downloadable.status_code == 409 and "no checkpoint" in not_downloadable.json()["detail"]


def test_logs_are_fetched_incrementally_by_cursor(api, user, make_job):
    from jobs.services import lifecycle

    job = make_job(user)
    lifecycle.job_start(job_id=job.pk, task_id=job.celery_task_id, worker="w")
    first = api.get(f"/api/v1/jobs/{job.pk}/logs/").json()
    lifecycle.job_record_progress(
        job_id=job.pk, task_id=job.celery_task_id, log_lines=[("calibrating", "layer 1"), ("calibrating", "layer 2")]
    )

    new = api.get(f"/api/v1/jobs/{job.pk}/logs/", {"after": first["cursor"]}).json()

    assert [line["text"] for line in new["lines"]] == ["layer 1", "layer 2"]
    assert api.get(f"/api/v1/jobs/{job.pk}/logs/", {"after": new["cursor"]}).json()["lines"] == []


def test_presets_are_listed_with_descriptions(api):
    presets = {p["name"]: p for p in api.get("/api/v1/presets/").json()}
    assert {"fp8-dynamic", "int8-w8a8-gptq"} <= set(presets)
    assert presets["fp8-dynamic"]["needs_calibration"] is False and presets["int8-w8a8-gptq"]["description"]


def test_calibration_upload_counts_rows_and_rejects_bad_files(api, api_for, other_user):
    good = io.BytesIO(b'{"text": "hello world"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    good.name = "cal.jsonl"
    bad = io.BytesIO(b"this is not json\n")
    bad.name = "bad.jsonl"

    created = api.post("/api/v1/calibration-datasets/", {"file": good, "name": "mine"}, format="multipart")
    refused = api.post("/api/v1/calibration-datasets/", {"file": bad}, format="multipart")

    assert created.status_code == 201 and created.json()["rows"] == 2 and len(created.json()["sha256"]) == 64
    assert refused.status_code == 400 and "file" in refused.json()
    assert [d["name"] for d in api.get("/api/v1/calibration-datasets/").json()["results"]] == ["mine"]
    assert api_for(other_user).get("/api/v1/calibration-datasets/").json()["count"] == 0


def test_a_job_can_use_an_uploaded_calibration_file(api):
    upload = io.BytesIO(b"".join(b'{"text": "sample number %d for calibration"}\n' % i for i in range(10)))
    upload.name = "cal.jsonl"
    dataset = api.post("/api/v1/calibration-datasets/", {"file": upload}, format="multipart").json()

    body = {"preset": "int8-w8a8-gptq", "calibration": {"kind": "upload", "dataset_id": dataset["id"], "samples": 8}}
    response = api.post("/api/v1/jobs/", body, format="json")

    assert response.status_code == 201, response.content
    assert response.json()["calibration"]["dataset_id"] == dataset["id"]
    too_many = {**body, "calibration": {**body["calibration"], "samples": 50}}
    assert "calibration" in api.post("/api/v1/jobs/", too_many, format="json").json()


def test_schema_and_docs_are_served_without_a_cdn(api):
    schema = api.get("/api/v1/schema/", HTTP_ACCEPT="application/json")
    docs = api.get("/api/v1/docs/")

    assert schema.status_code == 200 and "/api/v1/jobs/" in schema.json()["paths"]
    html = docs.content.decode()
    assert docs.status_code == 200 and "swagger-ui" in html
    # No CDN address (the page's CSRF token is random letters and digits: an address, not the letters)
    assert not re.search(r"cdn[.-]|//cdn|/cdn/", html.lower()) and "/static/drf_spectacular_sidecar/" in html


def test_every_operation_has_a_summary_and_authorize_says_how_to_get_a_token(api, client, user):
    schema = api.get("/api/v1/schema/", HTTP_ACCEPT="application/json").json()

    operations = [(method, path, op) for path, ops in schema["paths"].items() for method, op in ops.items()]
    assert len(operations) >= 20
    without = [f"{method.upper()} {path}" for method, path, op in operations if not op.get("summary", "").strip()]
    assert without == []
    # Swagger UI's Authorize shows each scheme's description: what to type, and the page that gives the key.
    token = schema["components"]["securitySchemes"]["tokenAuth"]
    assert "Token <key>" in token["description"] and "/api-token/" in token["description"]
    client.force_login(user)
    assert client.get("/api-token/").status_code == 200  # the page it names is there
