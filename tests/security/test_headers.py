"""Response headers: a Content-Security-Policy on every answer that every page keeps (checked in Chromium: no
violation on any page, the API docs included), and `Cache-Control: private, no-store` on what a signed-in user
or a token sees."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def test_every_answer_has_the_policy_and_signed_in_ones_are_never_cached(client, api, user, make_job, settings):
    job = make_job(user)
    anonymous = client.get("/accounts/login/")
    client.force_login(user)
    pages = ["/", "/jobs/new/", f"/jobs/{job.pk}/", f"/jobs/{job.pk}/log.txt", "/hub-token/", "/calibration-files/"]
    settings.COMPRESSOR_JOB_CREATE_RATE = "0/hour"
    api_answers = [
        api.get("/api/v1/jobs/"),
        api.get(f"/api/v1/jobs/{job.pk}/"),
        api.get("/api/v1/jobs/0.5/"),
        api.post("/api/v1/jobs/", {"preset": "fp8-dynamic"}, format="json"),  # a 429
    ]

    for response in [anonymous, *(client.get(path) for path in pages), *api_answers]:
        policy = response["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
        assert "frame-ancestors 'none'" in policy and "object-src 'none'" in policy
    for response in [*(client.get(path) for path in pages), *api_answers]:
        assert {"private", "no-store"} <= {part.strip() for part in response["Cache-Control"].split(",")}


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_no_page_breaks_the_policy_in_a_browser(new_page, sign_in, make_user, succeeded_job):
    alice = make_user("alice", is_staff=True)
    job = succeeded_job(alice)
    succeeded_job(alice, preset="w4a16-gptq", after=90_000_000, quality=0.97)
    page = new_page()
    # Every violation the browser reports, from the first script of each page on
    page.context.add_init_script(
        "window.__violations = [];"
        "document.addEventListener('securitypolicyviolation',"
        " (e) => window.__violations.push(e.violatedDirective + ' ' + (e.blockedURI || 'inline')));"
    )
    console = []
    page.on("console", lambda message: console.append(message.text))
    sign_in(page, "alice")

    seen = {}
    for path, ready in [
        ("/", "table.jobs-table"),
        ("/jobs/new/", "form"),
        (f"/jobs/{job.pk}/", "svg.chart"),
        (f"/compare/?model={job.model_source}", "svg.chart-scatter"),
        ("/calibration-files/", "h1"),
        ("/hub-token/", "h1"),
        ("/admin/", "#content"),
        ("/api/v1/docs/", ".swagger-ui .info .title"),
    ]:
        page.goto(path)
        page.wait_for_selector(ready, state="attached", timeout=30_000)
        page.wait_for_load_state("networkidle")
        if path == "/jobs/new/":  # the form's script shows the upload fields when that kind is chosen
            page.locator('input[name="calibration_kind"][value="upload"]').check()
            assert page.locator("#calibration-files-link").is_visible()
        seen[path] = page.evaluate("window.__violations")

    assert all(not violations for violations in seen.values()), seen
    assert not [text for text in console if "Content Security Policy" in text], console
