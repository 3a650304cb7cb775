"""The job list costs a constant number of SQL queries per page, however long the history.

The dashboard benchmark (bench/, part 4) measures the list's latency with 10 000 jobs; this test pins the
cause of the usual regression: a query per row (N+1). It counts the queries of GET /api/v1/jobs/ with 10
jobs and again with 200 (a full page of 25), for finished jobs and for a page of queued jobs (whose queue
position the list shows).
"""

from __future__ import annotations

import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner(django_user_model):
    return django_user_model.objects.create_user(username=f"bench-{uuid.uuid4().hex[:6]}", password="pw")


@pytest.fixture
def api(owner):
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    client = APIClient()
    token, _ = Token.objects.get_or_create(user=owner)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def _add_jobs(owner, count: int, status: str) -> None:
    from jobs.models import Job

    fields = {"results": None, "manifest": None}
    if status == Job.Status.SUCCEEDED:
        fields = {
            "results": {"size_before_bytes": 2, "size_after_bytes": 1, "timings": {"load_s": 1.0}},
            "manifest": {"files": [{"path": "model.safetensors", "size": 1, "sha256": "0" * 64}]},
        }
    Job.objects.bulk_create(
        Job(
            owner=owner,
            preset="fp8-dynamic",
            calibration_kind="none",
            queue="gpu",
            status=status,
            celery_task_id=str(uuid.uuid4()),
            **fields,
        )
        for _ in range(count)
    )


def _list_page(api, path: str = "/api/v1/jobs/") -> tuple[dict, list[str]]:
    """The list's answer and the SQL of its second request (the first warms token lookups, content types)."""
    api.get(path)
    with CaptureQueriesContext(connection) as ctx:
        response = api.get(path)
    assert response.status_code == 200, response.content[:300]
    return response.json(), [query["sql"] for query in ctx.captured_queries]


def _list_queries(api, path: str = "/api/v1/jobs/") -> int:
    return len(_list_page(api, path)[1])


@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_api_list_queries_do_not_grow_with_finished_jobs(api, owner, status):
    _add_jobs(owner, 10, status)
    small = _list_queries(api)
    _add_jobs(owner, 190, status)
    large = _list_queries(api)
    assert large == small, f"{small} queries with 10 jobs, {large} with 200: a query per row"


def test_api_list_queries_do_not_grow_with_queued_jobs(api, owner):
    _add_jobs(owner, 10, "queued")
    small = _list_queries(api)
    _add_jobs(owner, 190, "queued")
    large = _list_queries(api)
    assert large == small, f"{small} queries with 10 queued jobs, {large} with 200: a query per row"


def test_api_list_last_page_costs_the_same_as_the_first(api, owner):
    # Given 190 jobs: seven full pages of 25 and a last one of 15
    _add_jobs(owner, 190, "succeeded")

    # When the first and the last page are read
    first, first_sql = _list_page(api, "/api/v1/jobs/?page=1")
    last, last_sql = _list_page(api, "/api/v1/jobs/?page=8")

    # Then the last page holds the other 15 jobs, read past the first 175 rows in the database (OFFSET)...
    assert first["count"] == last["count"] == 190
    assert len(first["results"]) == 25 and len(last["results"]) == 15
    assert {job["id"] for job in first["results"]}.isdisjoint(job["id"] for job in last["results"])
    assert any("OFFSET 175" in sql for sql in last_sql), last_sql
    # ...with as many queries as the first: nothing per row, nothing per page number
    assert len(last_sql) == len(first_sql)


@pytest.fixture
def operator(django_user_model):
    from django.test import Client

    client = Client()
    client.force_login(django_user_model.objects.create_user(username="root", is_staff=True, is_superuser=True))
    return client


def _page_queries(client, path: str) -> int:
    client.get(path)  # warm: session, content types
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(path)
    assert response.status_code == 200, response.content[:300]
    return len(ctx.captured_queries)


@pytest.mark.parametrize("path", ["/admin/jobs/job/queue/", "/admin/jobs/job/"])
def test_admin_queue_pages_queries_do_not_grow_with_queued_jobs(operator, owner, path):
    # The queue page numbers every waiting job and the job list shows each row's place in the queue
    _add_jobs(owner, 10, "queued")
    small = _page_queries(operator, path)
    _add_jobs(owner, 190, "queued")
    large = _page_queries(operator, path)
    assert large == small, f"{path}: {small} queries with 10 queued jobs, {large} with 200: a query per row"
