"""Policy in the services: the creation rate (shared cache) covers the API, the form, retries and clones and
counts only created jobs; quotas (active jobs, stored bytes) are counted in the database under a lock."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from django.conf import settings as django_settings
from django.core.files.uploadedfile import SimpleUploadedFile

from jobs.models import Job
from tests.support import REPO

FP8 = {"preset": "fp8-dynamic", "force": True}


@pytest.fixture
def alice_api(api_for, make_user):
    alice = make_user("alice")
    return alice, api_for(alice)


def test_creation_rate_covers_api_form_retry_and_clone(alice_api, client_for, make_job, settings):
    # Given a rate of 2 jobs an hour, both used through the API
    settings.COMPRESSOR_JOB_CREATE_RATE = "2/hour"
    alice, api = alice_api
    assert [api.post("/api/v1/jobs/", FP8, format="json").status_code for _ in range(2)] == [201, 201]
    cancelled = make_job(alice, status=Job.Status.CANCELLED)
    page = client_for(alice)

    # When she tries the API, the form, a retry (API and page) and a clone
    api_answer = api.post("/api/v1/jobs/", FP8, format="json")
    api_retry = api.post(f"/api/v1/jobs/{cancelled.pk}/retry/")
    form = {
        "model_source": "builtin",
        "preset": "fp8-dynamic",
        "calibration_kind": "none",
        "calibration_split": "train",
        "calibration_column": "text",
        "calibration_samples": 32,
        "calibration_max_seq_len": 256,
        "priority": 5,
        "device_class": "gpu",
        "force": "on",
    }
    form_answer = page.post("/jobs/new/", form)
    clone_answer = page.post("/jobs/new/", {**form, "clone_of": cancelled.pk})
    page_retry = page.post(f"/jobs/{cancelled.pk}/retry/", follow=True)

    # Then each is refused with the reason, and no job was made
    assert api_answer.status_code == 429 and "created 2 jobs" in api_answer.json()["detail"]
    assert int(api_answer["Retry-After"]) > 0
    assert api_retry.status_code == 429 and "try again in" in api_retry.json()["detail"]
    assert form_answer.status_code == 429 and "created 2 jobs" in form_answer.content.decode()
    assert clone_answer.status_code == 429
    # the form's 429 says when to come back as the API's does
    assert int(form_answer["Retry-After"]) > 0 and int(clone_answer["Retry-After"]) > 0
    assert "The retry was refused: You have created 2 jobs" in page_retry.content.decode()
    assert Job.objects.filter(owner=alice).count() == 3  # the two created and the cancelled one


def test_refused_and_duplicate_requests_do_not_count(alice_api, settings):
    settings.COMPRESSOR_JOB_CREATE_RATE = "2/hour"
    _, api = alice_api
    # Five requests preflight refuses (a GPTQ preset without calibration data), fixed, then a duplicate
    for _ in range(5):
        bad = api.post(
            "/api/v1/jobs/", {**FP8, "preset": "int8-w8a8-gptq", "calibration": {"kind": "none"}}, format="json"
        )
        assert bad.status_code == 400, bad.content
    assert api.post("/api/v1/jobs/", FP8, format="json").status_code == 201
    assert api.post("/api/v1/jobs/", {**FP8, "priority": 9}, format="json").status_code == 400  # over the cap
    assert api.post("/api/v1/jobs/", FP8, format="json").status_code == 201
    assert api.post("/api/v1/jobs/", FP8, format="json").status_code == 429


def test_a_request_answered_by_an_earlier_identical_job_gives_its_place_back(alice_api, settings):
    # Given a rate of 2 an hour and one job created, which then succeeded
    settings.COMPRESSOR_JOB_CREATE_RATE = "2/hour"
    alice, api = alice_api
    first = api.post("/api/v1/jobs/", {"preset": "fp8-dynamic"}, format="json")
    assert first.status_code == 201, first.content
    Job.objects.filter(pk=first.json()["id"]).update(status=Job.Status.SUCCEEDED)

    # When the same job is asked for twice more: both answered by the earlier job, none created
    for _ in range(2):
        again = api.post("/api/v1/jobs/", {"preset": "fp8-dynamic"}, format="json")
        assert again.status_code == 200 and again.json()["duplicate"] is True, again.content
        assert again.json()["id"] == first.json()["id"]

    # Then only the created job counted: one more is created, and the one after is refused
    assert api.post("/api/v1/jobs/", FP8, format="json").status_code == 201
    assert api.post("/api/v1/jobs/", FP8, format="json").status_code == 429


def test_the_window_slides_twice_the_limit_never_fits_around_a_boundary_and_a_place_comes_back():
    import redis

    from jobs.ratelimit import Window
    from tests.support import wait_until

    client = redis.Redis.from_url(django_settings.CACHES["default"]["LOCATION"])

    def clock() -> float:  # the windows run on Redis' clock
        seconds, micros = client.time()
        return seconds + micros / 1e6

    window = Window(name="test-sliding", subject=f"alice-{os.getpid()}", rate="2/4s")
    # Given both places taken just before a 4-second boundary (where a fixed window would start afresh)
    wait_until(lambda: 2.9 <= clock() % 4 < 3.4, timeout=8, interval=0.02, what="just before a 4 s boundary")
    first, second = window.take(), window.take()
    assert first and second and window.count() == 2

    # When the boundary has passed, a third is still refused, told when the oldest leaves the window
    wait_until(lambda: clock() % 4 < 1, timeout=3, interval=0.02, what="just after the boundary")
    assert window.take() is None and 1 <= window.seconds_left() <= 4
    assert 0 < client.ttl(first.key) <= 5  # the set lives a period (and a second) past its last event

    # Then a place given back is free again, and the first one comes back once it is 4 s old
    Window.give_back(second)
    assert window.count() == 1 and window.take() is not None and window.take() is None
    assert wait_until(window.take, timeout=6, interval=0.1, what="the first place leaving the window")
    assert window.count() == 2


def test_processes_share_one_count(alice_api, settings):
    # Given a rate of 2 an hour, one job created by this process
    settings.COMPRESSOR_JOB_CREATE_RATE = "2/hour"
    alice, api = alice_api
    assert api.post("/api/v1/jobs/", FP8, format="json").status_code == 201

    # When another web process (its own Python on the same Redis) counts a job it created for her
    script = (
        "from jobs.services import policy; "
        f"window = policy.creation_window({alice.pk}); "
        "print('seen', window.count()); assert window.take()"
    )
    env = {**os.environ, "COMPRESSOR_JOB_CREATE_RATE": "2/hour"}
    env["COMPRESSOR_CACHE_PREFIX"] = django_settings.CACHES["default"]["KEY_PREFIX"]
    other = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    # Then it saw this process' job, and this process counts its job too: the next is refused
    assert other.returncode == 0 and "seen 1" in other.stdout, other.stdout + other.stderr
    assert api.post("/api/v1/jobs/", FP8, format="json").status_code == 429


def test_fifty_parallel_submissions_stop_at_the_active_jobs_quota(make_user, api_for, transactional_db, settings):
    # Given a quota of 3 active jobs (and no rate limit in the way)
    settings.COMPRESSOR_USER_MAX_ACTIVE_JOBS = 3
    settings.COMPRESSOR_JOB_CREATE_RATE = "1000/hour"
    alice = make_user("alice")
    api_for(alice)  # her token
    answers: list = []
    start = threading.Barrier(50)

    def submit() -> None:
        from django.db import connection

        client = api_for(alice)
        try:
            start.wait()
            answers.append(client.post("/api/v1/jobs/", FP8, format="json"))
        finally:
            connection.close()

    # When 50 requests arrive at once, each in its own thread and database connection
    threads = [threading.Thread(target=submit) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    # Then exactly 3 jobs exist and the other 47 were told why
    codes = sorted(answer.status_code for answer in answers)
    assert codes == [201] * 3 + [429] * 47, codes
    refused = [answer.json()["detail"] for answer in answers if answer.status_code == 429]
    assert all("3 jobs queued or running, the most allowed (3)" in reason for reason in refused)
    assert Job.objects.filter(owner=alice, status__in=Job.ACTIVE).count() == 3


def test_stored_bytes_quota_refuses_jobs_and_uploads(alice_api, make_job, settings):
    settings.COMPRESSOR_USER_MAX_STORED_BYTES = 10_000_000
    alice, api = alice_api
    make_job(alice, status=Job.Status.SUCCEEDED, results={"size_after_bytes": 9_990_000})

    upload = api.post(
        "/api/v1/calibration-datasets/",
        {"file": SimpleUploadedFile("rows.jsonl", b'{"text": "' + b"x" * 20_000 + b'"}\n')},
        format="multipart",
    )
    make_job(alice, status=Job.Status.SUCCEEDED, results={"size_after_bytes": 20_000})
    job = api.post("/api/v1/jobs/", FP8, format="json")

    assert upload.status_code == 429 and "the quota is 10.0 MB" in upload.json()["detail"]
    assert job.status_code == 429 and "You store 10.0 MB" in job.json()["detail"]


def test_the_priority_cap_is_the_services_rule_for_every_caller(alice_api, client_for, make_job, make_user):
    from engine.errors import PreflightError
    from jobs.inputs import JobInput
    from jobs.services import submissions

    alice, api = alice_api
    # The API and the form refuse 9 from a user beside the priority field; the service refuses any caller
    api_answer = api.post("/api/v1/jobs/", {**FP8, "priority": 9}, format="json")
    assert api_answer.status_code == 400 and "At most 5" in api_answer.json()["priority"][0]
    form = client_for(alice).post(
        "/jobs/new/",
        {"model_source": "builtin", "preset": "fp8-dynamic", "calibration_kind": "none", "priority": 9}
        | {"calibration_split": "train", "calibration_column": "text", "calibration_samples": 32}
        | {"calibration_max_seq_len": 256, "device_class": "gpu"},
    )
    assert form.status_code == 400 and 'id="priority-error"' in form.content.decode()
    with pytest.raises(PreflightError) as refused:
        submissions.job_submit(owner=alice, data=JobInput(preset="fp8-dynamic", calibration_kind="none", priority=9))
    assert refused.value.field == "priority"
    # Staff may; a retry of a job an operator raised to 9 keeps within its owner's cap
    staff = make_user("operator", is_staff=True)
    assert submissions.job_submit(owner=staff, data=JobInput(preset="fp8-dynamic", calibration_kind="none", priority=9))
    raised = make_job(alice, status=Job.Status.FAILED, priority=9)
    assert submissions.job_retry(job=raised).priority == 5
