"""The dashboard's views through Django's test client: who sees what, the form's errors beside their
fields (preflight by the same jobs service as the API), and the pages for each job state."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from jobs.models import CalibrationDataset, Job

pytestmark = pytest.mark.django_db

FORM = {
    "model_source": "builtin",
    "builtin_model": "smollm2-135m-instruct",
    "preset": "fp8-dynamic",
    "calibration_kind": "builtin",
    "calibration_split": "train",
    "calibration_column": "text",
    "calibration_samples": "8",
    "calibration_max_seq_len": "128",
    "evaluate_offline": "on",
    "priority": "5",
    "device_class": "cpu",
}


def _html(response) -> str:
    return response.content.decode()


# --- access ---------------------------------------------------------------------------------------------


def test_pages_ask_anonymous_visitors_to_sign_in(client):
    for url in ("/", "/jobs/new/", "/compare/", "/jobs/1/", "/api-token/"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/"), url


def test_the_sign_in_page_signs_in(client, alice):
    # Given the sign-in page
    page = client.get("/accounts/login/")
    assert page.status_code == 200 and 'autocomplete="current-password"' in _html(page)

    # When alice signs in with a wrong and then the right password
    wrong = client.post("/accounts/login/", {"username": "alice", "password": "nope"})
    right = client.post("/accounts/login/", {"username": "alice", "password": "pw-for-tests"})

    # Then the first is refused in words tied to the inputs, and the second lands on the jobs list
    assert wrong.status_code == 200 and 'role="alert"' in _html(wrong) and 'aria-invalid="true"' in _html(wrong)
    assert right.status_code == 302 and right["Location"] == "/"


def test_another_users_job_does_not_exist_for_you(client_for, alice, bob, make_job):
    # Given a job of alice's
    job = make_job(alice)
    as_bob = client_for(bob)

    # When bob asks for its page, its live part, or cancels it
    # Then each answers 404, and the job is untouched
    assert as_bob.get(f"/jobs/{job.pk}/").status_code == 404
    assert as_bob.get(f"/jobs/{job.pk}/live/").status_code == 404
    assert as_bob.post(f"/jobs/{job.pk}/cancel/").status_code == 404
    assert as_bob.get(f"/jobs/new/?from={job.pk}").status_code == 404
    job.refresh_from_db()
    assert job.status == "queued"
    # ...while alice sees it
    assert client_for(alice).get(f"/jobs/{job.pk}/").status_code == 200


def test_staff_see_links_to_the_admin_queue_and_everyone_to_the_api_docs(client_for, make_user):
    staff_page = _html(client_for(make_user("operator", is_staff=True)).get("/"))
    user_page = _html(client_for(make_user("someone")).get("/"))
    assert reverse("admin:jobs_job_queue") in staff_page and reverse("admin:jobs_job_queue") not in user_page
    assert "/api/v1/docs/" in user_page


# --- the jobs list --------------------------------------------------------------------------------------


def test_the_list_has_an_empty_state_that_says_how_to_start(client_for, alice):
    html = _html(client_for(alice).get("/"))
    assert "No jobs yet" in html and "fp8-dynamic" in html and reverse("frontend:job-new") in html


def test_the_list_shows_your_jobs_with_queue_place_sizes_and_recovery(client_for, alice, bob, make_job, succeeded_job):
    # Given two queued jobs and a succeeded one of alice's, and one of bob's
    first, second = make_job(alice), make_job(alice)
    done = succeeded_job(alice, quality=0.991)
    make_job(bob, preset="w4a16-gptq")

    # When alice opens the list
    html = _html(client_for(alice).get("/"))

    # Then she sees her three jobs only, with queue places, sizes before -> after and the headline recovery
    assert {int(i) for i in re.findall(r'data-job-id="(\d+)"', html)} == {first.pk, second.pk, done.pk}
    assert "#1 in the gpu queue" in html and "#2 in the gpu queue" in html
    assert "269.1 MB" in html and "164.0 MB" in html and "99.1 %" in html
    assert '<th scope="col" class="num">Perplexity recovery</th>' in html  # which metric the column shows


def test_a_recovery_of_one_percent_reads_one_percent_on_every_screen(client_for, alice, succeeded_job):
    # Given a job whose perplexity went from 12.84 to 1284: the engine stores a recovery of 1.0 (percent)
    job = succeeded_job(alice, quality=0.01)
    as_alice = client_for(alice)

    # When alice looks at the list, the job page and compare
    listed, page, compare = (_html(as_alice.get(url)) for url in ("/", f"/jobs/{job.pk}/", "/compare/"))

    # Then each says 1.0 %, never 100 %
    for html in (listed, page):
        assert "<strong>1.0 %</strong>" in html and "<strong>100.0 %</strong>" not in html
    assert '<span class="muted small">1.0 %</span>' in compare and "164.0 MB, 1.0 %" in compare


def test_the_list_filters_by_status_and_preset(client_for, alice, make_job, succeeded_job):
    queued = make_job(alice, preset="w8a16-gptq")
    done = succeeded_job(alice)
    as_alice = client_for(alice)

    by_status = _html(as_alice.get("/", {"status": "succeeded"}))
    by_preset = _html(as_alice.get("/", {"preset": "w8a16-gptq"}))
    nothing = _html(as_alice.get("/", {"status": "failed"}))

    assert f'data-job-id="{done.pk}"' in by_status and f'data-job-id="{queued.pk}"' not in by_status
    assert f'data-job-id="{queued.pk}"' in by_preset and f'data-job-id="{done.pk}"' not in by_preset
    assert "No jobs match these filters" in nothing


def test_the_rows_fragment_says_whether_to_keep_polling(client_for, alice, make_job):
    as_alice = client_for(alice)
    assert 'data-active="false"' in _html(as_alice.get("/jobs/rows/"))
    make_job(alice)
    fragment = _html(as_alice.get("/jobs/rows/"))
    assert 'data-active="true"' in fragment and "<html" not in fragment


# --- the new-job form -----------------------------------------------------------------------------------


def test_the_form_describes_each_preset_and_what_it_needs(client_for, alice, settings):
    settings.COMPRESSOR_ALLOW_LOCAL_PATHS = False
    html = _html(client_for(alice).get("/jobs/new/"))
    assert "Needs: no calibration data (data-free)" in html
    assert "layer input widths divisible by 128" in html and "Reproduces seed card 003" in html
    assert 'name="local_path"' not in html and 'value="local"' not in html
    assert 'for="id_hub_id"' in html and 'aria-describedby="hub_id-help"' in html

    settings.COMPRESSOR_ALLOW_LOCAL_PATHS = True
    assert 'name="local_path"' in _html(client_for(alice).get("/jobs/new/"))


def test_a_grouped_presets_description_says_the_group_size_the_model_gets(client_for, alice, make_job):
    from engine.presets import PRESETS

    # Before a model is chosen, the form names every group size w8a16-gptq may take, not a fixed 128
    form = _html(client_for(alice).get("/jobs/new/"))
    assert "GPTQ int8 weights in groups of 128 (64 or 32 where 128 does not divide every layer)" in form

    # A job that ran in groups of 64 (or of 128) says that size alone on its page
    w8a16 = PRESETS["w8a16-gptq"]
    for size in (64, 128):
        job = make_job(alice, preset="w8a16-gptq", resolved_recipe=w8a16.with_group_size(size).recipe_yaml())
        page = _html(client_for(alice).get(f"/jobs/{job.pk}/"))
        assert f"GPTQ int8 weights in groups of {size}, activations kept in 16 bits." in page


def test_a_preflight_error_appears_beside_its_field_and_nothing_is_queued(client_for, alice, random_llama, settings):
    # Given a model of hidden size 80, whose layer widths none of 128, 64 and 32 divides
    settings.COMPRESSOR_ALLOW_LOCAL_PATHS = True
    model = random_llama("width-80", hidden_size=80, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4)
    # When alice asks for w4a16-gptq through the form
    form = {**FORM, "model_source": "local", "local_path": str(model), "preset": "w4a16-gptq"}
    response = client_for(alice).post("/jobs/new/", form)

    # Then the form comes back with the group-size error beside the preset, tied to its inputs
    html = _html(response)
    assert response.status_code == 400
    error = re.search(r'<p class="field-error" id="preset-error">(.*?)</p>', html, re.S)
    assert error and "Group size 128" in error.group(1) and "(80, 160)" in error.group(1)
    # ...naming the checkbox that lets it through by its label on this form
    label = re.search(r'<label for="id_ignore_indivisible"[^>]*>(.*?)</label>', html, re.S)
    assert label and f"“{label.group(1).strip()}”" in error.group(1)
    assert re.search(r'<input type="radio" name="preset" value="w4a16-gptq"[^>]*aria-describedby="preset-error"', html)
    assert 'aria-invalid="true"' in html and "The job was not queued" in html
    # ...her choices are kept, and no job exists
    assert re.search(r'value="w4a16-gptq"[^>]*checked', html)
    assert not Job.objects.exists()


def test_a_job_no_registered_worker_can_hold_is_refused_beside_the_model_with_the_figures(
    client_for, alice, builtin_model
):
    from engine.resources import MB, WorkerCaps, WorkerResources
    from jobs import nodes

    # Given one registered cpu worker with 500 MB of host memory (the built-in model needs 836 MB to hold it)
    small = WorkerResources(host_ram_bytes=500 * MB, disk_free_bytes=50_000 * MB)
    nodes.node_announce(hostname="cpu@small", queues=["cpu", "node.cpu@small"], resources=small, caps=WorkerCaps())

    # When alice submits a cpu job on the built-in model through the form
    response = client_for(alice).post("/jobs/new/", FORM)

    # Then the form comes back with the refusal beside the model, with what it needs and what the worker has
    html = _html(response)
    assert response.status_code == 400
    error = re.search(r'<p class="field-error" id="builtin_model-error">(.*?)</p>', html, re.S)
    assert error and "No cpu worker here can hold this job. The largest, cpu@small" in error.group(1)
    assert "836.3 MB needed to hold the whole model" in error.group(1) and "500.0 MB available" in error.group(1)
    assert not Job.objects.exists()


def test_the_forms_own_checks_point_at_their_fields(client_for, alice):
    as_alice = client_for(alice)
    hub = _html(as_alice.post("/jobs/new/", {**FORM, "model_source": "hub", "hub_id": ""}))
    custom = _html(as_alice.post("/jobs/new/", {**FORM, "preset": "custom", "recipe_yaml": ""}))
    priority = _html(as_alice.post("/jobs/new/", {**FORM, "priority": "9"}))
    gpus = _html(as_alice.post("/jobs/new/", {**FORM, "device_class": "gpu", "gpus": "2"}))
    assert 'id="hub_id-error"' in hub and "owner/name" in hub
    assert 'id="gpus-error"' in gpus and "9 attention heads" in gpus
    assert 'id="recipe_yaml-error"' in custom
    assert 'id="priority-error"' in priority and "At most 5" in priority
    assert not Job.objects.exists()


def test_a_local_path_is_refused_where_the_operator_does_not_allow_it(client_for, alice, settings):
    settings.COMPRESSOR_ALLOW_LOCAL_PATHS = False
    html = _html(client_for(alice).post("/jobs/new/", {**FORM, "model_source": "local", "local_path": "/etc"}))
    assert 'id="model_source-error"' in html and not Job.objects.exists()


def test_a_bad_upload_is_refused_beside_the_file_field(client_for, alice):
    from django.core.files.uploadedfile import SimpleUploadedFile

    upload = SimpleUploadedFile("calib.jsonl", b'{"text": "fine"}\nnot json at all\n', content_type="application/jsonl")
    response = client_for(alice).post(
        "/jobs/new/", {**FORM, "preset": "int8-w8a8-gptq", "calibration_kind": "upload", "calibration_upload": upload}
    )
    html = _html(response)
    assert response.status_code == 400 and 'id="calibration_upload-error"' in html
    assert not Job.objects.exists() and not CalibrationDataset.objects.exists()


def test_a_good_upload_is_kept_and_previewed_when_the_job_is_refused(client_for, alice, random_llama, settings):
    from django.core.files.uploadedfile import SimpleUploadedFile

    settings.COMPRESSOR_ALLOW_LOCAL_PATHS = True
    model = random_llama("width-80", hidden_size=80, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4)
    rows = b"".join(b'{"text": "calibration row %d"}\n' % i for i in range(8))
    upload = SimpleUploadedFile("calib.jsonl", rows, content_type="application/jsonl")
    # w4a16-gptq on a model of width 80 fails preflight after the file was stored: the re-shown form keeps it
    # selected and previews it
    form = {**FORM, "model_source": "local", "local_path": str(model), "preset": "w4a16-gptq"}
    response = client_for(alice).post(
        "/jobs/new/", {**form, "calibration_kind": "upload", "calibration_upload": upload}
    )
    html = _html(response)
    dataset = CalibrationDataset.objects.get(owner=alice)
    assert response.status_code == 400 and dataset.rows == 8
    assert re.search(rf'<option value="{dataset.pk}" selected>', html)
    assert "calibration row 0" in html and "calibration row 4" in html and "calibration row 5" not in html


def test_a_valid_form_queues_the_job_through_the_service(client_for, alice, builtin_model):
    # When alice submits the built-in model with fp8-dynamic
    response = client_for(alice).post(
        "/jobs/new/", {**FORM, "evaluation_tasks": "gsm8k, arc_easy", "evaluation_limit": "10"}
    )

    # Then one job is queued with what she asked for, and she lands on its page
    job = Job.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/jobs/{job.pk}/"
    assert (job.owner, job.status, job.preset, job.model_source) == (
        alice,
        "queued",
        "fp8-dynamic",
        "smollm2-135m-instruct",
    )
    assert job.device_class == "cpu" and job.priority == 5 and job.resolved_recipe
    assert job.evaluation == {
        "offline": True,
        "tasks": ["gsm8k", "arc_easy"],
        "limit": 10,
        "heldout_path": None,
        "backend": "hf",
    }


def test_a_task_floor_from_the_form_is_recorded_and_comes_back_on_clone(client_for, alice, builtin_model):
    # When alice asks for 99 % of the baseline on an lm-eval task, judged on that task
    as_alice = client_for(alice)
    form = {**FORM, "evaluation_tasks": "compressor_arithmetic", "floor_percent": "99", "floor_metric": "task_recovery"}
    response = as_alice.post("/jobs/new/", {**form, "search_max_trials": "3"})

    # Then the job's search states the floor on the tasks' recovery
    job = Job.objects.get()
    assert response.status_code == 302, _html(response)
    assert (
        job.search["floor"] == {"metric": "task_recovery", "at_least": 0.99} and job.search["budget"]["max_trials"] == 3
    )
    # ...and clone and edit starts from the same choice
    page = _html(as_alice.get(f"/jobs/new/?from={job.pk}"))
    assert re.search(r'<option value="task_recovery"[^>]*selected', page)


def test_a_task_floor_without_tasks_is_refused_beside_the_floor(client_for, alice, builtin_model):
    response = client_for(alice).post("/jobs/new/", {**FORM, "floor_percent": "99", "floor_metric": "task_recovery"})
    assert response.status_code == 400 and not Job.objects.exists()
    assert "needs the lm-eval tasks" in _html(response)


def test_clone_and_edit_starts_from_the_old_request_and_links_the_new_job(client_for, alice, builtin_model, make_job):
    source = make_job(
        alice, preset="int8-w8a8-gptq", calibration_kind="builtin", calibration_samples=16, priority=3, status="failed"
    )
    as_alice = client_for(alice)

    form = _html(as_alice.get(f"/jobs/new/?from={source.pk}"))
    assert re.search(r'value="int8-w8a8-gptq"[^>]*checked', form) and f'name="clone_of" value="{source.pk}"' in form
    assert 'name="calibration_samples" value="16"' in form

    response = as_alice.post("/jobs/new/", {**FORM, "clone_of": str(source.pk)})
    clone = Job.objects.exclude(pk=source.pk).get()
    assert response.status_code == 302 and clone.retry_of == source and clone.preset == "fp8-dynamic"


# --- one job --------------------------------------------------------------------------------------------


def test_a_queued_job_page_shows_its_place_and_a_cancel_button(client_for, alice, make_job):
    make_job(alice)
    job = make_job(alice)
    html = _html(client_for(alice).get(f"/jobs/{job.pk}/"))
    assert "<strong>#2</strong> in the <code>gpu</code> queue" in html
    assert f'action="/jobs/{job.pk}/cancel/"' in html and 'data-reload-when-done="true"' in html


def test_a_queued_job_page_estimates_the_wait_and_lists_what_is_ahead(client_for, alice, bob, make_job):
    from datetime import timedelta

    from django.utils import timezone

    now = timezone.now()
    for minutes in (2, 3, 10):  # the queue's recent runs: median 3 min
        make_job(bob, status="succeeded", started_at=now - timedelta(minutes=minutes), finished_at=now)
    make_job(bob, status="succeeded", queue="cpu", started_at=now - timedelta(hours=5), finished_at=now)
    make_job(bob, status="running", started_at=now - timedelta(minutes=1))  # about 2 min left of its 3
    mine = make_job(alice, model_source="my-org/first-model")
    make_job(bob, model_source="bob-org/secret-model")
    job = make_job(alice)

    html = _html(client_for(alice).get(f"/jobs/{job.pk}/"))

    # two jobs ahead at 3 min each and the running one's 2 min, one worker: about 8 min
    assert re.search(r"<strong>#3</strong> in the <code>gpu</code> queue, about (8 min|7 min 5\d s) until", html)
    assert "2 jobs ahead" in html and f'href="/jobs/{mine.pk}/"' in html and "my-org/first-model" in html
    assert "another user's job" in html and "bob-org/secret-model" not in html


def test_the_form_offers_the_worker_class_that_live_workers_serve(client_for, alice, settings):
    from datetime import timedelta

    from django.utils import timezone

    from jobs.models import WorkerNode

    settings.COMPRESSOR_DEFAULT_DEVICE_CLASS = "gpu"
    now = timezone.now()
    WorkerNode.objects.create(hostname="cpu0@box", node="box", queues=["cpu"], started_at=now, heartbeat_at=now)
    gone = now - timedelta(hours=1)
    WorkerNode.objects.create(hostname="gpu0@old", node="old", queues=["gpu"], started_at=gone, heartbeat_at=gone)

    form = _html(client_for(alice).get("/jobs/new/"))

    assert '<option value="cpu" selected>' in form and '<option value="gpu" selected>' not in form


def test_an_owner_deletes_an_ended_job_with_its_files_after_confirming(
    client_for, alice, bob, make_job, succeeded_job, django_capture_on_commit_callbacks
):
    from tests.frontend.conftest import current_media_root

    job = succeeded_job(alice)
    running = make_job(alice, status="running")
    as_alice = client_for(alice)
    folder = current_media_root() / job.artifacts_relpath()
    assert folder.is_dir()

    assert 'id="delete-job"' in _html(as_alice.get(f"/jobs/{job.pk}/"))
    assert 'id="delete-job"' not in _html(as_alice.get(f"/jobs/{running.pk}/"))
    assert client_for(bob).post(f"/jobs/{job.pk}/delete/", {"confirm": "yes"}).status_code == 404
    # without the script the button's post asks on a page first, and deletes nothing
    assert "Yes, delete job" in _html(as_alice.post(f"/jobs/{job.pk}/delete/"))
    assert Job.objects.filter(pk=job.pk).exists()

    with django_capture_on_commit_callbacks(execute=True):
        response = as_alice.post(f"/jobs/{job.pk}/delete/", {"confirm": "yes"}, follow=True)

    assert f"Job {job.pk} is deleted, with its files." in _html(response)
    assert not Job.objects.filter(pk=job.pk).exists() and not folder.exists()
    refused = _html(as_alice.post(f"/jobs/{running.pk}/delete/", {"confirm": "yes"}, follow=True))
    assert "cancel it before deleting it" in refused and Job.objects.get(pk=running.pk).status == "running"


def test_the_jobs_page_shows_the_users_quota(client_for, alice, make_job, settings):
    settings.COMPRESSOR_USER_MAX_ACTIVE_JOBS = 7
    settings.COMPRESSOR_USER_MAX_STORED_BYTES = 2 * 10**9
    make_job(alice, status="running")
    make_job(alice, status="succeeded", results={"size_after_bytes": 150_000_000})

    html = _html(client_for(alice).get("/"))

    assert "Your quota" in html
    assert re.search(r"150(\.0)? MB of 2(\.00?)? GB", html), re.findall(r"<dd>.*?</dd>", html)
    assert "<dd>1 of 7</dd>" in html and "of 30/hour" in html


def test_the_form_says_where_a_recipe_breaks_yaml_in_one_sentence(client_for, alice, builtin_model):
    recipe = "quant_stage:\n  quant_modifiers: [QuantizationModifier\n  other: 1\n"
    html = _html(client_for(alice).post("/jobs/new/", {**FORM, "preset": "custom", "recipe_yaml": recipe}))

    error = re.search(r'id="recipe_yaml-error"[^>]*>(.*?)</', html, re.S).group(1)
    assert "The recipe is not valid YAML at line 3, column 8: did not find expected &#x27;,&#x27; or" in error
    assert "<unicode string>" not in html and "&lt;unicode string&gt;" not in html and "^" not in error


def test_an_unreachable_hub_never_advises_a_local_folder_where_they_are_disabled(
    client_for, alice, settings, monkeypatch
):
    settings.COMPRESSOR_ALLOW_LOCAL_PATHS = False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    html = _html(client_for(alice).post("/jobs/new/", {**FORM, "model_source": "hub", "hub_id": "org/a-model"}))

    assert "cannot be reached from this machine" in html and "Use the built-in model" in html
    assert "local model folder" not in html.lower() and 'value="local"' not in html


def test_cancel_and_retry_call_the_services(client_for, alice, make_job, builtin_model):
    job = make_job(alice, calibration_kind="builtin")
    as_alice = client_for(alice)

    assert as_alice.post(f"/jobs/{job.pk}/cancel/", {"confirm": "yes"}).status_code == 302
    job.refresh_from_db()
    assert job.status == "cancelled"

    response = as_alice.post(f"/jobs/{job.pk}/retry/")
    retry = Job.objects.get(retry_of=job)
    assert response["Location"] == f"/jobs/{retry.pk}/" and retry.attempt == 2 and retry.status == "queued"
    # Cancelling twice is refused politely
    as_alice.post(f"/jobs/{job.pk}/cancel/", {"confirm": "yes"})
    assert "already cancelled" in _html(as_alice.get(f"/jobs/{job.pk}/"))


def test_a_running_job_shows_layer_progress_and_time_left(client_for, alice, make_job):
    from datetime import timedelta

    from django.utils import timezone

    from jobs.models import JobLogLine

    started = timezone.now() - timedelta(seconds=60)
    job = make_job(
        alice, status="running", stage="calibrating", step=6, total=30, percent=20.0, started_at=started,
        preset="int8-w8a8-gptq", calibration_kind="builtin", evaluation={"offline": True},
    )  # fmt: skip
    line = JobLogLine.objects.create(job=job, stage="calibrating", text="(6/30): Calibrating")
    JobLogLine.objects.filter(pk=line.pk).update(created_at=started)

    html = _html(client_for(alice).get(f"/jobs/{job.pk}/live/"))

    assert "layer 6 of 30" in html and 'aria-valuenow="20"' in html
    assert re.search(r"about 4 min( 0\d s)? left", html)  # 60 s for 20 % of the job -> 240 s for the rest
    assert "(6/30): Calibrating" in html and "tl-current" in html
    # The stages this GPTQ job goes through, labelled as they are: calibration compresses too, vLLM checks
    labels = re.findall(r'<span class="tl-label">(.*?)</span>', html)
    assert labels == ["Waiting in the queue", "Preparing", "Loading", "Calibrating and compressing", "Saving",
                      "Checking in vLLM", "Evaluating", "Writing the card and hashing the files"]  # fmt: skip


def test_an_evaluating_job_says_how_far_the_evaluation_is(client_for, alice, make_job):
    from django.utils import timezone

    job = make_job(
        alice, status="running", stage="evaluating", step=400, total=1000, percent=70.0, started_at=timezone.now(),
        message="Evaluating compressed, perplexity, KL and top-1 agreement on 16 windows, generations",
    )  # fmt: skip
    html = _html(client_for(alice).get(f"/jobs/{job.pk}/live/"))
    rows = _html(client_for(alice).get("/jobs/rows/"))
    # one percent, the job's: the evaluation's own share beside it would disagree ("40 %" beside "70 %")
    assert 'id="job-time-left">70 %' in html and "40 %" not in html and "400 of 1000" not in html
    assert "40 %" not in rows and "<strong>Evaluating</strong>" in html


def test_a_finished_data_free_job_lists_only_the_stages_that_ran(client_for, alice, succeeded_job):
    from jobs.models import JobLogLine

    job = succeeded_job(alice)  # fp8-dynamic: data-free, evaluated
    for stage in ("preparing", "loading", "compressing", "saving", "evaluating", "hashing"):
        JobLogLine.objects.create(job=job, stage=stage, text=f"{stage} line")
    html = _html(client_for(alice).get(f"/jobs/{job.pk}/live/"))
    labels = re.findall(r'<span class="tl-label">(.*?)</span>', html)
    # a CPU run has no "Checking in vLLM" stage: it is listed only where it ran
    assert labels == ["Waiting in the queue", "Preparing", "Loading", "Compressing", "Saving", "Evaluating",
                      "Writing the card and hashing the files", "Succeeded"]  # fmt: skip
    assert "skipped" not in html and "Calibrating" not in html


def test_a_failed_job_page_gives_the_reason_and_the_last_log_lines(client_for, alice, make_job):
    from jobs.models import JobLogLine

    job = make_job(alice, status="failed", error="The model does not fit in host memory.")
    JobLogLine.objects.create(job=job, stage="loading", text="loading shards")
    html = _html(client_for(alice).get(f"/jobs/{job.pk}/"))
    assert "Why it failed" in html and "The model does not fit in host memory." in html
    assert "loading shards" in html and f'action="/jobs/{job.pk}/retry/"' in html


def test_a_succeeded_job_page_shows_results_charts_card_and_downloads(client_for, alice, succeeded_job):
    job = succeeded_job(alice, quality=0.991)
    html = _html(client_for(alice).get(f"/jobs/{job.pk}/"))

    # The results table in the seed cards' shape: baseline | compressed | recovery, defined beside it;
    # top-1 agreement already compares with the baseline, so it has no recovery
    table = re.search(r'<table class="table results-table".*?</table>', html, re.S).group(0)
    assert "Perplexity (held-out text)" in table and "12.84" in table and "99.1 %" in table
    agreement = re.search(r"Top-1 token agreement.*?</tr>", table, re.S).group(0)
    assert "99.1" in agreement and "<strong>—</strong>" in agreement
    assert 'id="recovery-definition">Recovery is the compressed model' in html
    # The device that ran it and its memory plan
    assert "Compressed on <strong>cpu</strong>: the whole model in host memory" in html
    assert 'id="memory-plan"' in html and "(capped by the operator)" in html
    assert '<span class="stat-label">Compress</span>' in html  # fp8-dynamic is data-free: no calibration
    # Sizes in one convention (decimal), the files' too; charts (inline SVG, no script), generations side by side.
    # No size in "KB" (a size, not the letters: the page's CSRF tokens are random letters and digits).
    assert "269.1 MB" in html and "164.0 MB" in html and ">50.0 kB</td>" in html and not re.search(r"\d KB", html)
    assert html.count('<svg class="chart') == 2 and "model.layers.29.mlp.down_proj" in html
    assert "The capital of France is Paris, a city on the Seine." in html
    # The model card is rendered, its raw HTML escaped
    assert "<h1>smollm2-135m-instruct-fp8-dynamic</h1>" in html and "<script>alert(1)</script>" not in html
    # Downloads point at the API: archive, manifest and each file
    assert f'href="/api/v1/jobs/{job.pk}/archive/"' in html and f'href="/api/v1/jobs/{job.pk}/manifest/"' in html
    assert f'href="/api/v1/jobs/{job.pk}/files/model.safetensors"' in html


def test_the_job_page_shows_the_memory_plan_and_its_figures(client_for, alice, succeeded_job):
    # Given a job the worker ran with disk offload on a GPU, host memory capped by the operator
    job = succeeded_job(alice)
    job.results["settings"] = {
        "device": "cuda (NVIDIA H100 80GB HBM3)",
        "memory_plan": {
            "mode": "disk_offload",
            "device": "cuda:0",
            "summary": "disk offload, host memory being short: 174.33 GB of the weights in host memory",
            "figures": {
                "host_ram": {"needed": 88_044_033_792, "available": 256_000_000_000, "capped": True},
                "gpu": {"needed": 33_700_000_000, "available": 79_000_000_000, "capped": False, "name": "H100"},
                "disk": {"needed": 1_449_149_290_240, "available": 4_000_000_000_000, "capped": False},
            },
        },
    }
    job.save()

    # When its owner opens the page, then the plan's way and each resource's figures are there
    html = _html(client_for(alice).get(f"/jobs/{job.pk}/"))
    assert "Compressed on <strong>cuda (NVIDIA H100 80GB HBM3)</strong>: disk offload, host memory being short" in html
    table = re.search(r'<table class="table compact" id="memory-plan">.*?</table>', html, re.S).group(0)
    assert "Memory plan: disk offload" in table
    rows = re.findall(r"<tr><th scope=\"row\">(.*?)</th><td>(.*?)</td><td>(.*?)</td></tr>", table)
    assert rows == [
        ("Host memory", "88.04 GB", '256.00 GB <span class="muted small">(capped by the operator)</span>'),
        ("GPU memory (H100)", "33.70 GB", "79.00 GB"),
        ("Disk", "1449.15 GB", "4000.00 GB"),
    ]


def test_a_job_from_before_the_memory_plan_had_figures_still_shows_its_sentence(client_for, alice, succeeded_job):
    job = succeeded_job(alice)
    job.results["settings"] = {
        "device": "cpu",
        "memory_plan": "the whole model in host memory (about 538.1 MB planned)",
    }
    job.save()
    html = _html(client_for(alice).get(f"/jobs/{job.pk}/"))
    assert "Compressed on <strong>cpu</strong>: the whole model in host memory (about 538.1 MB planned)." in html
    assert 'id="memory-plan"' not in html


def test_a_succeeded_job_without_an_evaluation_still_renders(client_for, alice, succeeded_job):
    job = succeeded_job(alice)
    job.results = {"size_before_bytes": 100, "size_after_bytes": 50}
    job.save()
    html = _html(client_for(alice).get(f"/jobs/{job.pk}/"))
    assert "ran no evaluation" in html and 'id="results-table"' not in html


# --- compare --------------------------------------------------------------------------------------------


def test_compare_puts_jobs_of_one_model_side_by_side(client_for, alice, bob, succeeded_job):
    fp8 = succeeded_job(alice, preset="fp8-dynamic", after=164_000_000, quality=0.991)
    int8 = succeeded_job(alice, preset="int8-w8a8-gptq", after=160_000_000, quality=0.975)
    other = succeeded_job(bob, preset="w8a16-gptq")

    html = _html(client_for(alice).get("/compare/", {"model": "smollm2-135m-instruct"}))

    table = re.search(r'<table class="table compare-table".*?</table>', html, re.S).group(0)
    assert f"#{fp8.pk}" in table and f"#{int8.pk}" in table and f"#{other.pk}" not in table
    assert "97.5 %" in table and "99.1 %" in table and "Baseline" in table
    assert "Quality: perplexity recovery, relative to the baseline" in html
    assert '<svg class="chart chart-scatter"' in html


def test_compare_without_succeeded_jobs_says_what_to_do(client_for, alice):
    assert "Nothing to compare yet" in _html(client_for(alice).get("/compare/"))


# --- presentation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ({"name": "perplexity", "recovery": 1.0}, 1.0),  # a percentage, however small: never guessed a ratio
        ({"name": "perplexity", "recovery": 99.1}, 99.1),
        ({"name": "arc_challenge", "task": True, "recovery": 96.4}, 96.4),
        ({"name": "kl_divergence", "recovery": 97.3}, None),  # stored by older versions: means nothing
        ({"name": "top1_agreement", "recovery": 99.0}, None),
        ({"name": "perplexity"}, None),
    ],
)
def test_recovery_is_the_stored_percentage_where_it_means_something(metric, expected):
    from frontend.presentation import recovery_percent

    assert recovery_percent(metric) == expected


def test_the_model_card_on_the_page_keeps_user_strings_as_text(client_for, alice, succeeded_job):
    from engine.card import write_model_card
    from jobs import downloads

    # Given a checkpoint whose card was written from a custom recipe with a link and HTML in its ignore list
    job = succeeded_job(alice)
    recipe = (
        "quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      scheme: FP8_DYNAMIC\n"
        "      ignore: ['lm_head', '[click me](https://evil.example)', '<img src=x onerror=alert(1)>']\n"
    )
    evaluation = {
        **job.results["evaluation"],
        "generations": [
            {"prompt": "Hi", "baseline": "Visit [us](https://evil.example)", "compressed": "line one\nline two"}
        ],
    }
    write_model_card(
        downloads.checkpoint_dir(job), model_name="custom", base_model="smollm2-135m-instruct",
        architecture="LlamaForCausalLM", preset=None, recipe_yaml=recipe, calibration=None, evaluation=evaluation,
        size_before_bytes=2, size_after_bytes=1, settings=job.results["settings"],
    )  # fmt: skip

    # When alice opens the job page
    html = _html(client_for(alice).get(f"/jobs/{job.pk}/"))
    card = re.search(r'<div class="model-card">(.*?)</div>\s*</details>', html, re.S).group(1)

    # Then the card is there, its own links work, and the user's strings are text: no link, no image, no HTML
    assert '<a href="https://github.com/vllm-project/llm-compressor">' in card
    assert "evil.example" in card and 'href="https://evil.example' not in card
    assert "<img" not in card and "&lt;img src=x onerror=alert(1)&gt;" in card
    assert "<blockquote>\n<p>line one<br />\nline two</p>" in card  # the generation's own lines, no literal \\n
    assert "<strong>Compressed on:</strong> cpu" in card


@pytest.mark.parametrize(
    "results", [None, {}, {"evaluation": "oops"}, {"metrics": "x", "layer_errors": [1, {"error": "?"}]}]
)
def test_odd_results_show_nothing_rather_than_fail(results):
    from frontend import presentation

    assert presentation.metric_rows(results) == [] and presentation.layer_errors(results) == []
    assert presentation.sizes(results) is None and presentation.generations(results) == []


def test_the_pages_stages_are_the_engines_stages_in_order():
    from engine.spec import STAGES

    assert tuple(Job.Stage.values) == ("waiting", *STAGES)


# --- the API token page ---------------------------------------------------------------------------------------


def test_the_api_token_page_shows_a_new_key_once_and_a_rotated_or_revoked_key_is_refused(alice, client_for):
    from rest_framework.test import APIClient

    client = client_for(alice)

    def api_status(key: str) -> int:
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
        return api.get("/api/v1/jobs/").status_code

    # Given no token: the page offers to create one
    assert "You have no API token." in _html(client.get("/api-token/"))

    # When she creates one, the answer shows the key, uncached; the API takes it; the page after shows its hint only
    created = client.post("/api-token/", {"action": "create"})
    first = re.search(r'id="new-api-token">([0-9a-f]{40})<', _html(created)).group(1)
    assert "no-store" in created["Cache-Control"]
    assert api_status(first) == 200
    again = _html(client.get("/api-token/"))
    assert first not in again and f"…{first[-4:]}" in again

    # When she rotates it, the new key works and the old one is refused
    second = re.search(r'id="new-api-token">([0-9a-f]{40})<', _html(client.post("/api-token/", {"action": "rotate"})))
    assert second.group(1) != first
    assert api_status(first) == 401 and api_status(second.group(1)) == 200

    # When she revokes it, it is refused too, and the page says so
    revoked = client.post("/api-token/", {"action": "revoke"}, follow=True)
    assert "Your API token is revoked" in _html(revoked) and "You have no API token." in _html(revoked)
    assert api_status(second.group(1)) == 401


def test_the_job_page_is_in_sections_downloads_near_the_top_and_the_long_parts_folded(alice, client_for, succeeded_job):
    older = succeeded_job(alice, preset="w8a16-gptq")
    job = succeeded_job(alice)

    html = _html(client_for(alice).get(f"/jobs/{job.pk}/"))

    # A jump-nav of plain anchors, most used first, each to a section on the page
    nav = re.search(r'<nav class="jump-nav" aria-label="Sections of this job">(.*?)</nav>', html, re.S).group(1)
    anchors = re.findall(r'href="#([\w-]+)"', nav)
    assert anchors == ["job-live", "summary", "results", "charts", "generations", "card", "files", "pushes", "log",
                       "request"]  # fmt: skip
    positions = [html.index(f'id="{anchor}"') for anchor in anchors]
    assert positions == sorted(positions)
    # The download button comes before the results table; the card and the log are folded (no `open`)
    assert html.index('id="download-archive"') < html.index('id="results-table"')
    for folded in ("card", "log"):
        assert re.search(rf'id="{folded}">\s*<details class="fold">', html), folded
    # The status is read out when it changes; the favicon is a file of its own
    assert re.search(r'id="job-status" role="status" aria-live="polite"', html)
    assert '<link rel="icon" type="image/svg+xml" href="/static/frontend/favicon.svg">' in html
    # Compare puts this job first, then the others of its model
    assert f'href="/compare/?model=smollm2-135m-instruct&amp;jobs={job.pk}&amp;jobs={older.pk}"' in html


def test_the_form_says_every_problem_at_once_and_ignores_the_fields_it_hides(client_for, alice, builtin_model):
    client = client_for(alice)

    # Given a hub id that is no id and zero calibration samples, both in one post
    response = client.post(
        "/jobs/new/", {**FORM, "model_source": "hub", "hub_id": "not an id!", "calibration_samples": "0"}
    )

    # Then both are said, each beside its field and linked from the summary
    html = _html(response)
    assert response.status_code == 400 and not Job.objects.exists()
    summary = re.search(r'<div class="error-summary".*?</div>', html, re.S).group(0)
    assert re.findall(r'<a href="#field-([\w-]+)">', summary) == ["hub_id", "calibration_samples"]
    assert 'id="hub_id-error">Not a Hugging Face model id' in html and 'id="calibration_samples-error">' in html
    for name in ("hub_id", "calibration_samples"):
        assert f'id="field-{name}"' in html

    # When the calibration is "none", its sample count is hidden and not used: zero there stops nothing
    queued = client.post("/jobs/new/", {**FORM, "calibration_kind": "none", "calibration_samples": "0"})
    assert queued.status_code == 302 and Job.objects.count() == 1
