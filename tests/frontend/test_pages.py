"""Pages a user reads at a glance: the log (no server paths, times with their zone, the whole log as a
download), cancel with a confirmation, the compare page's columns, and one source for the job statuses."""

from __future__ import annotations

import html
import re
import sysconfig

import pytest
from django.conf import settings

from jobs.models import Job, JobLogLine
from jobs.services import lifecycle

pytestmark = pytest.mark.django_db


def _html(response) -> str:
    return response.content.decode()


def _token_client(user):
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return api


@pytest.fixture
def logged_job(alice, make_job):
    """A running job with 60 log lines that name server folders, as llm-compressor and the worker write them."""
    job = make_job(alice, status=Job.Status.RUNNING, stage="calibrating")
    site = sysconfig.get_paths()["purelib"]
    texts = [f"Calibrating layer {i} of 60" for i in range(57)]
    texts += [
        f"{site}/transformers/modeling_utils.py:4321: UserWarning: `torch_dtype` is deprecated",
        f"Saving the checkpoint to {settings.MEDIA_ROOT}/jobs/{job.pk}/checkpoint",
        "Loading /srv/other/cache/models--x/snapshots/abc/config.json from https://huggingface.co/a/b",
    ]
    lifecycle.job_record_progress(
        job_id=job.pk, task_id=job.celery_task_id, log_lines=[("calibrating", text) for text in texts]
    )
    return job


def test_the_log_tail_hides_server_paths_and_says_its_time_zone(client_for, alice, logged_job):
    html = _html(client_for(alice).get(f"/jobs/{logged_job.pk}/"))
    log = html[html.index('id="h-log"') :]
    log = log[: log.index("</pre>")]

    assert "times in UTC" in log
    assert str(settings.MEDIA_ROOT) not in log and sysconfig.get_paths()["purelib"] not in log and "/srv/" not in log
    assert "&lt;packages&gt;/transformers/modeling_utils.py:4321" in log
    assert f"to &lt;media&gt;/jobs/{logged_job.pk}/checkpoint" in log
    assert "…/config.json from https://huggingface.co/a/b" in log
    assert f'href="/jobs/{logged_job.pk}/log.txt"' in log


def test_a_worker_log_line_reads_the_same_on_the_page_in_the_download_and_in_the_api(client_for, alice, make_job):
    # Given a line the worker reported through the service, which stores it redacted
    job = make_job(alice, status=Job.Status.RUNNING, stage="saving")
    site = sysconfig.get_paths()["purelib"]
    lifecycle.job_record_progress(
        job_id=job.pk,
        task_id=job.celery_task_id,
        log_lines=[("saving", f"Wrote {settings.MEDIA_ROOT}/jobs/{job.pk}/checkpoint via {site}/transformers/x.py")],
    )
    shown = f"Wrote <media>/jobs/{job.pk}/checkpoint via <packages>/transformers/x.py"

    # Then the job page, the whole log and the API's lines all show it as stored: the folders read once
    page = html.unescape(_html(client_for(alice).get(f"/jobs/{job.pk}/")))
    download = b"".join(client_for(alice).get(f"/jobs/{job.pk}/log.txt").streaming_content).decode()
    api = _token_client(alice).get(f"/api/v1/jobs/{job.pk}/logs/").json()["lines"]
    assert shown in page and shown in download and [line["text"] for line in api] == [shown]


def test_the_whole_log_downloads_as_text_for_its_owner_only(client_for, alice, bob, logged_job):
    for response in (
        client_for(alice).get(f"/jobs/{logged_job.pk}/log.txt"),
        _token_client(alice).get(f"/api/v1/jobs/{logged_job.pk}/log/"),
    ):
        assert response.status_code == 200
        assert response["Content-Type"] == "text/plain; charset=utf-8"
        assert f'filename="job-{logged_job.pk}-log.txt"' in response["Content-Disposition"]
        text = b"".join(response.streaming_content).decode()
        lines = text.splitlines()
        assert len(lines) == 1 + 60 and "times in UTC" in lines[0]  # every line, not the page's last 40
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[calibrating\] Calibrating layer 0 of 60$", lines[1])
        assert str(settings.MEDIA_ROOT) not in text and "/srv/" not in text

    assert client_for(bob).get(f"/jobs/{logged_job.pk}/log.txt").status_code == 404
    assert _token_client(bob).get(f"/api/v1/jobs/{logged_job.pk}/log/").status_code == 404


# --- cancel asks first; the page says when it does not update by itself -----------------------------------


def test_cancel_asks_for_confirmation_before_it_cancels(client_for, alice, make_job):
    job = make_job(alice, status=Job.Status.RUNNING, stage="calibrating")
    as_alice = client_for(alice)

    # The job page's button asks in a dialog when the script runs (data-confirm) ...
    page = _html(as_alice.get(f"/jobs/{job.pk}/"))
    assert re.search(rf'action="/jobs/{job.pk}/cancel/" data-confirm="Cancel job #{job.pk}\?', page)

    # ... and without the script its post (no "confirm") only brings a confirmation page, as does a GET
    for response in (as_alice.post(f"/jobs/{job.pk}/cancel/"), as_alice.get(f"/jobs/{job.pk}/cancel/")):
        assert response.status_code == 200 and f"Cancel job #{job.pk}?" in _html(response)
        assert 'name="confirm" value="yes"' in _html(response)
    job.refresh_from_db()
    assert job.status == Job.Status.RUNNING

    # When she confirms, it is cancelled
    response = as_alice.post(f"/jobs/{job.pk}/cancel/", {"confirm": "yes"}, follow=True)
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED and f"Job {job.pk} is cancelled." in _html(response)


def test_an_active_job_page_says_to_reload_without_javascript(client_for, alice, make_job, succeeded_job):
    running = make_job(alice, status=Job.Status.RUNNING, stage="loading")
    done = succeeded_job(alice)
    as_alice = client_for(alice)
    assert re.search(r"<noscript>.*reload it.*</noscript>", _html(as_alice.get(f"/jobs/{running.pk}/")), re.S)
    assert "<noscript>" not in _html(as_alice.get(f"/jobs/{done.pk}/"))


def test_the_pages_give_the_script_the_statuses_from_the_job_model(client_for, alice):
    import json

    html = _html(client_for(alice).get("/"))
    data = json.loads(re.search(r'<script id="job-statuses" type="application/json">(.*?)</script>', html).group(1))
    assert set(data["active"]) == set(Job.ACTIVE) and set(data["terminal"]) == set(Job.TERMINAL)
    assert set(data["icons"]) == set(Job.Status.values)


# --- compare ------------------------------------------------------------------------------------------------


def _header_cells(html: str) -> list[str]:
    head = html[html.index('id="compare-table"') :]
    head = head[: head.index("</thead>")]
    return [
        re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", cell)).strip()
        for cell in re.findall(r"<th[^>]*>(.*?)</th>", head, re.S)
    ]


def test_compare_tells_jobs_apart_marks_the_best_and_keeps_the_chosen_order(client_for, alice, succeeded_job):
    from django.utils import timezone

    # Given two fp8-dynamic jobs of different days and calibration, an int8 one, and one that ran no evaluation
    older = succeeded_job(alice, preset="fp8-dynamic", after=164_000_000, quality=0.95)
    newer = succeeded_job(alice, preset="fp8-dynamic", after=164_000_000, quality=0.99)
    Job.objects.filter(pk=older.pk).update(created_at=timezone.now() - timezone.timedelta(days=3))
    best = succeeded_job(alice, preset="int8-w8a8-gptq", after=150_000_000, quality=0.995)
    Job.objects.filter(pk=best.pk).update(calibration_kind="builtin", calibration_samples=64)
    bare = succeeded_job(alice, preset="w8a16-gptq", after=158_000_000, quality=0.99)
    bare.results.pop("evaluation")
    bare.save()

    # When she compares them in her own order
    order = [newer.pk, bare.pk, older.pk, best.pk]
    html = _html(client_for(alice).get("/compare/", {"model": "smollm2-135m-instruct", "jobs": order}))

    # Then the columns follow that order, and each header has the job's date and its calibration
    headers = _header_cells(html)[2:]
    assert [int(re.match(r"#(\d+)", h).group(1)) for h in headers] == order
    assert headers[0] != headers[2], "two fp8-dynamic jobs must not have the same header"
    older_day = (timezone.now() - timezone.timedelta(days=3)).strftime("%Y-%m-%d")
    assert older_day in headers[2] and "calibration: data-free" in headers[0]
    assert "calibration: built-in text 64 × 256" in headers[3]
    # ...the job without an evaluation says so (in its header, its cells and the chart) instead of vanishing
    assert "not evaluated" in headers[1]
    assert html.count('class="point-none"') == 1 and f"#{bare.pk} w8a16-gptq: 158.0 MB, not evaluated" in html
    # ...and the best value of each row is marked: the lowest perplexity, the smallest checkpoint (both int8)
    rows = re.findall(r"<tr><th scope=\"row\"[^>]*>(.*?)</tr>", html, re.S)
    for row in rows:
        cells = re.findall(r"<td class=\"num( best)?\">", row)
        assert cells[1 + order.index(best.pk)] == " best", row[:80]
        assert cells.count(" best") == 1


def test_compare_gives_the_star_to_every_tied_job_and_ticks_its_axis_on_round_sizes(client_for, alice, succeeded_job):
    # Given two jobs whose checkpoints read the same, 163.2 MB (a few kB apart), and a larger one
    first = succeeded_job(alice, preset="fp8-dynamic", after=163_180_000, quality=0.99)
    succeeded_job(alice, preset="int8-w8a8-gptq", after=163_240_000, quality=0.98)
    succeeded_job(alice, preset="w8a16-gptq", after=170_000_000, quality=0.97)

    html = _html(client_for(alice).get("/compare/", {"model": "smollm2-135m-instruct", "floor": "97.5"}))

    # Then both get the ★ for size
    size_row = re.search(r"<tr><th scope=\"row\"[^>]*>Checkpoint size.*?</tr>", html, re.S).group(0)
    assert size_row.count("★") == 2 and size_row.count("163.2 MB") == 2
    # ...the size axis (to the baseline's 269 MB) is ticked on round numbers, not on fractions of the largest size
    ticks = re.findall(r'<text class="tick" x="[0-9.]+" y="[0-9.]+" text-anchor="middle">([^<]+)</text>', html)
    assert ticks == ["0", "100", "200", "300"], ticks
    # ...and the recommendation writes its recovery as the table does (one decimal)
    assert f"#{first.pk} fp8-dynamic</strong>, 163.2 MB at 99.0 %, the smallest that keeps it" in html


# --- checksums a user can check ------------------------------------------------------------------------------


def test_the_checksums_download_passes_sha256sum_check(client_for, alice, bob, succeeded_job, make_job, tmp_path):
    import shutil
    import subprocess

    from tests.frontend.conftest import current_media_root

    job = succeeded_job(alice)
    page = _html(client_for(alice).get(f"/jobs/{job.pk}/"))
    assert f'href="/jobs/{job.pk}/SHA256SUMS"' in page and "sha256sum -c SHA256SUMS" in page

    response = client_for(alice).get(f"/jobs/{job.pk}/SHA256SUMS")
    assert response.status_code == 200 and response["Content-Type"] == "text/plain; charset=utf-8"
    unpacked = tmp_path / "checkpoint"
    shutil.copytree(current_media_root() / job.artifacts_path, unpacked)
    (unpacked / "SHA256SUMS").write_bytes(response.content)
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=unpacked, capture_output=True, text=True)
    assert check.returncode == 0 and "model.safetensors: OK" in check.stdout, check.stdout + check.stderr

    assert client_for(bob).get(f"/jobs/{job.pk}/SHA256SUMS").status_code == 404
    refused = client_for(alice).get(f"/jobs/{make_job(alice).pk}/SHA256SUMS")  # no checkpoint yet
    assert refused.status_code == 409 and b"no checkpoint to download" in refused.content


def test_the_timeline_starts_a_run_with_preparing_and_times_each_stage_from_its_first_line(alice, make_job):
    from datetime import timedelta

    from django.utils import timezone

    from frontend.presentation import timeline
    from jobs.selectors import job_stage_started

    # Given a run that was submitted, prepared for 4 s, loaded for 6 s and is calibrating now
    now = timezone.now()
    job = make_job(
        alice, preset="int8-w8a8-gptq", calibration_kind="builtin", status=Job.Status.RUNNING, stage="calibrating"
    )
    Job.objects.filter(pk=job.pk).update(created_at=now - timedelta(seconds=30), started_at=now - timedelta(seconds=20))
    for seconds_ago, stage in ((20, "preparing"), (16, "loading"), (10, "calibrating")):
        line = JobLogLine.objects.create(job=job, stage=stage, text=f"{stage} begins")
        JobLogLine.objects.filter(pk=line.pk).update(created_at=now - timedelta(seconds=seconds_ago))
    job.refresh_from_db()

    # When its timeline is drawn
    steps = {step.key: step for step in timeline(job, job_stage_started(job=job))}

    # Then it shows the wait, then preparing from the claim, loading and the current stage, in that order
    assert list(steps)[:4] == ["waiting", "preparing", "loading", "calibrating"]
    assert round(steps["waiting"].seconds) == 10 and round(steps["preparing"].seconds) == 4
    assert round(steps["loading"].seconds) == 6 and steps["calibrating"].state == "current"


@pytest.mark.parametrize(
    ("check", "shown"),
    [
        ({"ran": True, "tokens_per_s": 1834.2, "generations": ["Paris."]}, "loads and generates, 1834 generated"),
        ({"ran": True, "error": "ValueError: unsupported scheme"}, "vLLM could not load or run the checkpoint: Value"),
        ({"ran": True, "device": "cpu", "tokens_per_s": 69.5}, "Checked in vLLM on the CPU: the checkpoint loads"),
        (
            {"ran": True, "device": "cpu", "tensor_parallel_size": 2, "tokens_per_s": 4.0},
            "Checked in vLLM on the CPU, tensor parallel over 2 CPU ranks: the checkpoint loads",
        ),
        ({"ran": True, "device": "cuda", "tensor_parallel_size": 8}, "tensor parallel over 8 GPUs: the checkpoint"),
        ({"ran": False, "reason": "vLLM's CPU backend has no kernels"}, "Not checked in vLLM: vLLM&#x27;s CPU backend"),
    ],
)
def test_the_job_page_says_whether_vllm_loaded_the_checkpoint(client_for, alice, succeeded_job, check, shown):
    job = succeeded_job(alice)
    job.results = {**job.results, "settings": {**job.results.get("settings", {}), "device": "cuda (H100)"}}
    job.results["settings"]["vllm_check"] = check
    job.save()
    html = _html(client_for(alice).get(f"/jobs/{job.pk}/"))
    assert shown in html[html.index('id="vllm-check"') :]


@pytest.mark.parametrize(
    ("backend", "run", "shown"),
    [
        (
            "vllm",
            {"device": "gpu", "tensor_parallel_size": 8},
            "lm-eval tasks scored in vLLM, tensor parallel over 8 GPUs.",
        ),
        ("vllm", {"device": "gpu", "tensor_parallel_size": 1}, "lm-eval tasks scored in vLLM on one GPU."),
        (
            "vllm",
            {"device": "cpu", "tensor_parallel_size": 2},
            "lm-eval tasks scored in vLLM on the CPU, tensor parallel over 2 CPU ranks.",
        ),
        ("hf", None, None),
    ],
)
def test_the_job_page_says_where_vllm_scored_the_tasks(client_for, alice, succeeded_job, backend, run, shown):
    job = succeeded_job(alice)
    job.results = {
        **job.results,
        "settings": {**job.results.get("settings", {}), "device": "cuda (H100)"},
        "evaluation": {"metrics": [], "settings": {"device": "cuda", "backend": backend, "vllm": run}},
    }
    job.save()
    html = _html(client_for(alice).get(f"/jobs/{job.pk}/"))
    if shown is None:
        assert 'id="tasks-in-vllm"' not in html
    else:
        assert shown in html[html.index('id="tasks-in-vllm"') :]
