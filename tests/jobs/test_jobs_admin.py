"""The admin: job list with filters and search, bulk actions through the services, the queue page."""

from __future__ import annotations

import pytest

from jobs.models import Job

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(client, make_user):
    admin = make_user("root", is_staff=True, is_superuser=True)
    client.force_login(admin)
    return client


def test_job_list_filters_and_search(operator, user, other_user, make_job):
    make_job(user, status=Job.Status.FAILED, model_source="org/alpha")
    make_job(other_user, status=Job.Status.QUEUED, model_source="org/beta", device_class="cpu")

    page = operator.get("/admin/jobs/job/", {"status__exact": "failed"})
    found = operator.get("/admin/jobs/job/", {"q": "beta"})

    assert page.status_code == 200 and "org/alpha" in page.text and "org/beta" not in page.text
    assert "org/beta" in found.text and "org/alpha" not in found.text
    for title in ("By status", "By preset", "By owner", "By device class"):
        assert title in page.text


def _act(operator, action: str, jobs, **extra):
    data = {"action": action, "_selected_action": [str(j.pk) for j in jobs], **extra}
    return operator.post("/admin/jobs/job/", data, follow=True)


def test_cancel_retry_and_priority_actions_use_the_services(operator, user, make_job):
    queued = make_job(user, priority=5)
    failed = make_job(user, status=Job.Status.FAILED)

    _act(operator, "change_priority", [queued], priority="9")
    queued.refresh_from_db()
    assert queued.priority == 9

    response = _act(operator, "retry_jobs", [failed])
    retry = Job.objects.get(retry_of=failed)
    assert retry.status == Job.Status.QUEUED and f"{retry.pk}" in response.text

    response = _act(operator, "cancel_jobs", [queued, failed])
    queued.refresh_from_db()
    assert queued.status == Job.Status.CANCELLED
    assert "Skipped (already finished)" in response.text


def test_queue_page_lists_waiting_jobs_in_order(operator, user, make_job):
    low = make_job(user, priority=1)
    high = make_job(user, priority=9)

    page = operator.get("/admin/jobs/job/queue/")

    assert page.status_code == 200
    text = page.text
    assert "Workers online" in text and "Messages in the broker" in text
    assert text.index(f"/admin/jobs/job/{high.pk}/change/") < text.index(f"/admin/jobs/job/{low.pk}/change/")
    assert "Queue and workers" in operator.get("/admin/jobs/job/").text
