"""The dashboard's pages. Thin: read through jobs.selectors, act through jobs.services (the same
functions the API calls), and leave presentation to frontend.presentation and the templates."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.forms import Form
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from engine.errors import EngineError
from engine.presets import PRESETS, preset_for_recipe
from engine.units import RECOVERY_DEFINITION, size_text
from frontend import charts, presentation, trials
from frontend.forms import CUSTOM_RECIPE, HubPushForm, HubTokenForm, JobForm, apply_aria, preset_infos
from jobs import downloads, hub_push, hub_tokens, logtext, selectors
from jobs.inputs import JobInput
from jobs.models import Job
from jobs.ratelimit import RateLimited
from jobs.services import lifecycle, policy, storage, submissions, tokens
from jobs.services.errors import JobStateError

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 40
FAILED_LOG_LINES = 15
MODEL_CARD_MAX_BYTES = 512 * 1024
COMPARE_MAX_JOBS = 8
# Messages that state a job's status ("Job 12 is queued."): the page's script removes them once it changes.
JOB_STATE_MESSAGE = "job-state"


# --- the jobs list --------------------------------------------------------------------------------------


def _list_context(request: HttpRequest) -> dict[str, Any]:
    status = request.GET.get("status") or ""
    preset = request.GET.get("preset") or ""
    if status not in Job.Status.values:
        status = ""
    if preset not in PRESETS:
        preset = ""
    jobs = selectors.job_list_filtered(user=request.user, status=status or None, preset=preset or None)
    page = Paginator(jobs, 25).get_page(request.GET.get("page"))
    waiting = any(job.status == Job.Status.QUEUED for job in page.object_list)
    positions = selectors.queue_positions() if waiting else {}
    rows = []
    for job in page.object_list:
        rows.append(
            {
                "job": job,
                "queue_position": positions.get(job.pk),
                "sizes": presentation.sizes(job.results),
                "recovery": presentation.headline_recovery(job.results),
                "stage_detail": presentation.stage_detail(job),
            }
        )
    return {
        "rows": rows,
        "recovery_heading": presentation.headline_heading([job.results for job in page.object_list]),
        "page": page,
        "status": status,
        "preset": preset,
        "statuses": Job.Status.choices,
        "presets": list(PRESETS),
        "filtered": bool(status or preset),
        "any_active": any(row["job"].is_active for row in rows),
        "JobStatus": Job.Status,
        "query": request.GET.urlencode(),
    }


@login_required
def job_list(request: HttpRequest) -> HttpResponse:
    context = {**_list_context(request), "quota": policy.user_quota(request.user)}
    return render(request, "frontend/job_list.html", context)


@login_required
def job_rows(request: HttpRequest) -> HttpResponse:
    """The list's table body alone, for the page's live updates."""
    return render(request, "frontend/_job_rows.html", _list_context(request))


# --- a new job -------------------------------------------------------------------------------------------


def _default_initial() -> dict[str, Any]:
    return {
        "model_source": JobForm.SOURCE_BUILTIN,
        "preset": "fp8-dynamic",
        "calibration_kind": Job.CalibrationKind.BUILTIN,
        "evaluate_offline": True,
    }


def _new_job_form(request: HttpRequest, data=None, files=None, initial=None) -> JobForm:
    return JobForm(
        data,
        files,
        initial=initial,
        user=request.user,
        calibration_datasets=selectors.calibration_datasets_for_user(user=request.user).filter(owner=request.user),
    )


@login_required
def job_new(request: HttpRequest) -> HttpResponse:
    clone_source: Job | None = None
    if request.method != "POST":
        if request.GET.get("from"):
            clone_source = selectors.job_get_for_user(user=request.user, job_id=_int(request.GET["from"]))
            initial = JobForm.initial_from(JobInput.from_job(clone_source))
            form = _new_job_form(request, initial={**initial, "clone_of": clone_source.pk})
        else:
            form = _new_job_form(request, initial=_default_initial())
        return _render_form(request, form, clone_source)

    form = _new_job_form(request, request.POST, request.FILES)
    if form.is_valid():
        if form.cleaned_data.get("clone_of"):
            clone_source = selectors.job_get_for_user(user=request.user, job_id=form.cleaned_data["clone_of"])
        upload = form.cleaned_data.get("calibration_upload")
        dataset = None
        if upload and form.cleaned_data["calibration_kind"] == Job.CalibrationKind.UPLOAD:
            try:
                dataset = storage.calibration_dataset_create(owner=request.user, name=upload.name, upload=upload)
            except (EngineError, RateLimited) as exc:
                return _refused(request, form, clone_source, exc, field="calibration_upload")
            # From here on the form points at the stored file, so a re-shown form keeps it (and previews it).
            data = request.POST.copy()
            data["calibration_dataset"] = str(dataset.pk)
            form = _new_job_form(request, data)
            form.is_valid()
        try:
            job_input = form.to_job_input(calibration_file=dataset)
            force = form.cleaned_data.get("force", False)
            if clone_source is not None:
                submission = submissions.job_clone(job=clone_source, owner=request.user, data=job_input, force=force)
            else:
                submission = submissions.job_submit(owner=request.user, data=job_input, force=force)
        except RateLimited as exc:
            return _refused(request, form, clone_source, exc, field=None)
        except EngineError as exc:
            return _refused(request, form, clone_source, exc, field=form.field_for_engine(exc.field))
        else:
            job = submission.job
            if submission.created:
                messages.success(request, f"Job {job.pk} is queued.", extra_tags=JOB_STATE_MESSAGE)
            else:
                messages.info(
                    request,
                    f"An identical job of yours already succeeded: job {job.pk}. Tick “Run even if…” to run it again.",
                )
            return redirect("frontend:job-detail", pk=job.pk)
    return _render_form(request, form, clone_source, status=400)


def _refused(
    request: HttpRequest, form: JobForm, clone_source: Job | None, exc: EngineError | RateLimited, *, field: str | None
) -> HttpResponse:
    """The form again with the services' refusal beside its field, answered as the API answers it
    (jobs.api.exceptions): 400, or for a limit 429 with Retry-After."""
    form.add_error(field, exc.message)
    if isinstance(exc, RateLimited):
        response = _render_form(request, form, clone_source, status=429)
        response["Retry-After"] = str(exc.retry_after)
        return response
    return _render_form(request, form, clone_source, status=400)


def _render_form(request: HttpRequest, form: JobForm, clone_source: Job | None, status: int = 200) -> HttpResponse:
    form.apply_aria()
    preview, preview_name = [], ""
    dataset_id = form["calibration_dataset"].value()
    if dataset_id:
        dataset = form.fields["calibration_dataset"].queryset.filter(pk=_int(dataset_id)).first()
        if dataset is not None:
            preview, preview_name = selectors.calibration_dataset_preview(dataset=dataset), dataset.name
    infos = {info["name"]: info for info in preset_infos()}
    context = {
        "form": form,
        "preset_options": [(radio, infos.get(radio.data["value"])) for radio in form["preset"]],
        "custom_recipe": CUSTOM_RECIPE,
        "clone_source": clone_source,
        "preview": preview,
        "preview_name": preview_name,
        "error_count": len(form.errors) if form.is_bound else 0,
    }
    return render(request, "frontend/job_new.html", context, status=status)


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


# --- one job ---------------------------------------------------------------------------------------------


def _live_context(job: Job) -> dict[str, Any]:
    stage_started = selectors.job_stage_started(job=job)
    return {
        "job": job,
        "JobStatus": Job.Status,
        "queue_wait": selectors.queue_wait(job=job),
        "timeline": presentation.timeline(job, stage_started),
        "seconds_left": presentation.seconds_left(job),
        "log_lines": selectors.job_log_tail(job=job, lines=LOG_TAIL_LINES),
        "stage_label": Job.Stage(job.stage).label if job.stage in Job.Stage.values else job.stage,
        "stage_detail": presentation.stage_detail(job),
    }


def _model_card(job: Job) -> str | None:
    """The checkpoint's README.md rendered as HTML (raw HTML in it is escaped, not rendered)."""
    try:
        text = downloads.checkpoint_text(job, "README.md", max_bytes=MODEL_CARD_MAX_BYTES)
    except (downloads.NotDownloadable, OSError):
        return None
    if text is None:
        return None
    from frontend.templatetags.frontend_tags import render_markdown

    return render_markdown(text)


def _results_context(job: Job) -> dict[str, Any]:
    results = job.results
    rows = presentation.metric_rows(results)
    errors = presentation.layer_errors(results)
    worst = sorted(errors, key=lambda item: item[1], reverse=True)[:10]
    files = []
    if isinstance(job.manifest, dict):
        for entry in job.manifest.get("files", []):
            if isinstance(entry, dict) and entry.get("path"):
                files.append(
                    {
                        "path": entry["path"],
                        "size": entry.get("size"),
                        "sha256": entry.get("sha256", ""),
                        "url": reverse("api:job-file", kwargs={"pk": job.pk, "path": entry["path"]}),
                    }
                )
    return {
        "metric_rows": rows,
        "metric_chart": charts.metric_chart(rows),
        "sizes": presentation.sizes(results),
        "timings": presentation.timings(job),
        "layer_chart": charts.layer_error_chart(errors),
        "worst_layers": worst,
        "generations": presentation.generations(results),
        "model_card": _model_card(job),
        "files": files,
        "archive_url": reverse("api:job-archive", kwargs={"pk": job.pk}),
        "manifest_url": reverse("api:job-manifest", kwargs={"pk": job.pk}),
        "checksums_url": reverse("frontend:job-checksums", kwargs={"pk": job.pk}),
        "ignored_layers": (results or {}).get("ignored_layers") if isinstance(results, dict) else None,
        "run_settings": presentation.run_settings(results),
        "search": trials.search_of(results),
        "recovery_definition": RECOVERY_DEFINITION,
        "headline": presentation.headline(results),
    }


@login_required
def job_detail(request: HttpRequest, pk: int) -> HttpResponse:
    job = selectors.job_get_for_user(user=request.user, job_id=pk)
    context = _live_context(job)
    if job.status == Job.Status.SUCCEEDED:
        context.update(_results_context(job))
    if job.status == Job.Status.FAILED:
        context["failed_log"] = selectors.job_log_tail(job=job, lines=FAILED_LOG_LINES)
    context["preset_info"] = preset_for_recipe(job.preset, job.resolved_recipe)  # in the group size it ran
    context["search_request"] = trials.request_text(job.search)
    context["followups"] = list(job.followups.filter(owner=job.owner).order_by("-created_at")[:5])
    if job.status == Job.Status.SUCCEEDED:
        context["compare_url"] = _compare_url(request, job)
    context.update(_push_context(request, job))
    return render(request, "frontend/job_detail.html", context)


def _compare_url(request: HttpRequest, job: Job) -> str:
    """Compare with this job in the first column and the newest other succeeded jobs of its model beside it."""
    others = selectors.job_list_filtered(user=request.user, status=Job.Status.SUCCEEDED, model=job.model_source)
    ids = [job.pk, *others.exclude(pk=job.pk).values_list("pk", flat=True)[: COMPARE_MAX_JOBS - 1]]
    return reverse("frontend:compare") + "?" + urlencode([("model", job.model_source), *(("jobs", pk) for pk in ids)])


def _push_context(request: HttpRequest, job: Job, form: HubPushForm | None = None) -> dict[str, Any]:
    """The "Push to a hub" part of a succeeded job's page: its pushes and, for its owner, the form."""
    if job.status != Job.Status.SUCCEEDED:
        return {}
    form = form or HubPushForm()
    apply_aria(form)
    return {
        "pushes": hub_push.hub_pushes_for_job(job=job),
        "push_form": form if job.owner_id == request.user.pk else None,
        "hub_token": hub_tokens.hub_token_for(owner=request.user),
    }


@login_required
def job_live(request: HttpRequest, pk: int) -> HttpResponse:
    """The job page's live part alone (progress, timeline, log), polled while the job runs."""
    job = selectors.job_get_for_user(user=request.user, job_id=pk)
    return render(request, "frontend/_job_live.html", _live_context(job))


@login_required
def job_log(request: HttpRequest, pk: int) -> HttpResponse:
    """The whole log as text/plain (the owner's, or staff's: others get 404 like every job URL)."""
    return logtext.log_response(selectors.job_get_for_user(user=request.user, job_id=pk))


@login_required
def job_checksums(request: HttpRequest, pk: int) -> HttpResponse:
    """SHA256SUMS of the checkpoint, for `sha256sum -c` in the unpacked archive."""
    job = selectors.job_get_for_user(user=request.user, job_id=pk)
    try:
        return downloads.checksums_response(job)
    except downloads.NotDownloadable as exc:  # a download, not a page: `curl -f` and scripts see the 409
        return HttpResponse(str(exc), status=409, content_type="text/plain; charset=utf-8")


@login_required
@require_http_methods(["GET", "POST"])
def job_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    """Cancel after a confirmation: the job page's button posts without `confirm` (no script: this page asks)
    or with it (the script asked already, in a dialog); the confirmation page posts with it."""
    job = selectors.job_get_for_user(user=request.user, job_id=pk)
    if request.method != "POST" or request.POST.get("confirm") != "yes":
        if not job.is_active:
            return redirect("frontend:job-detail", pk=job.pk)
        return render(request, "frontend/job_cancel.html", {"job": job, "JobStatus": Job.Status})
    with _refusal_shown(request):
        lifecycle.job_cancel(job=job, by=request.user)
        messages.success(request, f"Job {job.pk} is cancelled.", extra_tags=JOB_STATE_MESSAGE)
    return redirect("frontend:job-detail", pk=job.pk)


@login_required
@require_http_methods(["GET", "POST"])
def job_delete(request: HttpRequest, pk: int) -> HttpResponse:
    """Delete one of one's own ended jobs after a confirmation, as job_cancel asks (a page without the script,
    a dialog with it); staff delete others' jobs in the admin."""
    job = selectors.job_get_owned(user=request.user, job_id=pk)
    if request.method != "POST" or request.POST.get("confirm") != "yes":
        if job.is_active:
            return redirect("frontend:job-detail", pk=job.pk)
        return render(request, "frontend/job_delete.html", {"job": job})
    with _refusal_shown(request, "The job was not deleted: "):
        lifecycle.job_delete(job=job)
        messages.success(request, f"Job {job.pk} is deleted, with its files.")
        return redirect("frontend:job-list")
    return redirect("frontend:job-detail", pk=job.pk)


@login_required
@require_POST
def job_retry(request: HttpRequest, pk: int) -> HttpResponse:
    job = selectors.job_get_for_user(user=request.user, job_id=pk)
    with _refusal_shown(request, "The retry was refused: "):
        new_job = submissions.job_retry(job=job)
        messages.success(request, f"Job {new_job.pk} retries job {job.pk}: it is queued.", extra_tags=JOB_STATE_MESSAGE)
        return redirect("frontend:job-detail", pk=new_job.pk)
    return redirect("frontend:job-detail", pk=job.pk)


@contextmanager
def _refusal_shown(request: HttpRequest, prefix: str = "", form: Form | None = None) -> Iterator[None]:
    """The pages' one mapping of the services' refusals (the job's state, a check, a limit, a checkpoint not
    there to download): one ends the block as the page's error message, or with a form, beside the field it
    names (above the form when it names none of its fields); the page then goes on as the view says (for the job
    form, _refused)."""
    try:
        yield
    except (JobStateError, EngineError, RateLimited, downloads.NotDownloadable) as exc:
        if form is None:
            messages.error(request, prefix + str(exc))
        else:
            field = getattr(exc, "field", None)
            form.add_error(field if field in form.fields else None, prefix + str(exc))


@login_required
@require_POST
def job_push(request: HttpRequest, pk: int) -> HttpResponse:
    """Queue a push of one's own succeeded job to a hub (the same service as POST /api/v1/jobs/<id>/push/)."""
    job = selectors.job_get_owned(user=request.user, job_id=pk)
    form = HubPushForm(request.POST)
    if not form.is_valid():
        messages.error(request, " ".join(error for errors in form.errors.values() for error in errors))
    else:
        with _refusal_shown(request):
            push = hub_push.hub_push_request(job=job, by=request.user, **form.cleaned_data)
            messages.success(request, f"The push to {push.repo_id} is queued; reload this page to follow it.")
    return redirect(reverse("frontend:job-detail", kwargs={"pk": job.pk}) + "#pushes")


# --- the hub token -----------------------------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def hub_token(request: HttpRequest) -> HttpResponse:
    """Set, replace or delete one's hub token; the page shows only its hint."""
    form = HubTokenForm()
    if request.method == "POST" and request.POST.get("delete"):
        if hub_tokens.hub_token_delete(owner=request.user):
            messages.success(request, "Your hub token is deleted.")
        return redirect("frontend:hub-token")
    if request.method == "POST":
        form = HubTokenForm(request.POST)
        if form.is_valid():
            with _refusal_shown(request, form=form):
                record = hub_tokens.hub_token_set(owner=request.user, token=form.cleaned_data["token"])
                messages.success(request, f"Your hub token {record.hint} is stored.")
                return redirect("frontend:hub-token")
    apply_aria(form)
    context = {
        "form": form,
        "hub_token": hub_tokens.hub_token_for(owner=request.user),
        "endpoint": hub_tokens.hub_endpoint(None),
    }
    return render(request, "frontend/hub_token.html", context, status=400 if form.errors else 200)


# --- the API token ----------------------------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def api_token(request: HttpRequest) -> HttpResponse:
    """Create, rotate or revoke one's own API token (for the CLI and the API). A new key is shown in the answer
    to the POST that made it and never again: the page after shows only its last four characters."""
    new_key = None
    if request.method == "POST" and request.POST.get("action") == "revoke":
        if tokens.token_revoke(user=request.user):
            messages.success(request, "Your API token is revoked: programs using it are refused from now on.")
        return redirect("frontend:api-token")
    if request.method == "POST":
        new_key = tokens.token_rotate(user=request.user)
    token = selectors.api_token_of(user=request.user)
    context = {
        "token": token,
        "hint": f"…{token.key[-4:]}" if token else "",
        "new_key": new_key,
        "server_url": request.build_absolute_uri("/").rstrip("/"),
    }
    response = render(request, "frontend/api_token.html", context)
    if new_key:
        response["Cache-Control"] = "no-store"  # the key is in this page alone: no cache may keep it
    return response


# --- calibration uploads ------------------------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def calibration_files(request: HttpRequest) -> HttpResponse:
    """One's uploaded calibration files, each with a delete button (refused while an active job uses it)."""
    files = selectors.calibration_datasets_for_user(user=request.user).filter(owner=request.user)
    if request.method == "POST":
        dataset = get_object_or_404(files, pk=_int(request.POST.get("delete")))
        try:
            storage.calibration_dataset_delete(dataset=dataset)
        except JobStateError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(request, f"The file '{dataset.name}' is deleted.")
        return redirect("frontend:calibration-files")
    return render(request, "frontend/calibration_files.html", {"files": files})


# --- compare --------------------------------------------------------------------------------------------


def _calibration_text(job: Job) -> str:
    """What calibrated the job, short enough for a column header: "data-free", "built-in text 32 × 256"."""
    preset = PRESETS.get(job.preset)
    if job.calibration_kind == Job.CalibrationKind.NONE or (preset is not None and not preset.needs_calibration):
        return "data-free"
    source = {
        Job.CalibrationKind.UPLOAD: job.calibration_file.name if job.calibration_file else "uploaded file",
        Job.CalibrationKind.HUB: job.calibration_hub_dataset,
    }.get(job.calibration_kind, job.get_calibration_kind_display().lower())
    return f"{source} {job.calibration_samples} × {job.calibration_max_seq_len}"


def _best_indexes(values: list[float | None], higher_is_better: bool, shown) -> set[int]:
    """The columns holding the best value of a row, ties included: values that read the same on the page
    (shown: the row's formatter, so 163.2 MB and 163.2 MB both get the ★); none when fewer than two have one."""
    present = [(value, index) for index, value in enumerate(values) if value is not None]
    if len(present) < 2:
        return set()
    best = shown((max if higher_is_better else min)(present)[0])
    return {index for value, index in present if shown(value) == best}


def _points_on_plane(columns: list[dict[str, Any]]) -> list[trials.TrialPoint]:
    """Each chosen job as a point, or, for a floor search or a sweep, each of its trials."""
    points: list[trials.TrialPoint] = []
    for column in columns:
        job = column["job"]
        searched = trials.trial_points(job.pk, job.results)
        if searched:
            points.extend(searched)
        elif column["sizes"]:
            recovery = presentation.headline_recovery(job.results)
            size = column["sizes"].after
            points.append(trials.TrialPoint(label=f"#{job.pk} {job.recipe_label}", size_bytes=size, recovery=recovery))
    return points


def _floor_percent(request: HttpRequest, jobs: list[Job]) -> float | None:
    """The floor to recommend for: ?floor= (percent), else the first chosen search's own floor."""
    try:
        asked = float(request.GET.get("floor", ""))
    except ValueError:
        asked = None
    if asked is not None and 0 < asked <= 100:
        return asked
    for job in jobs:
        search = trials.search_of(job.results)
        if search and search.get("floor_percent"):
            return float(search["floor_percent"])
    return None


def _size_quality_chart(points: list[charts.Point], frontier: list[trials.TrialPoint], floor: float | None):
    if len(points) < 2:
        return ""
    on_frontier = [charts.Point(label=p.label, size_bytes=p.size_bytes, quality=p.recovery) for p in frontier]
    return charts.size_quality_chart(points, frontier=on_frontier, floor=floor)


@login_required
def compare(request: HttpRequest) -> HttpResponse:
    models = selectors.job_models_for_user(user=request.user)
    model = request.GET.get("model") or (models[0] if models else "")
    candidates = (
        list(
            selectors.job_list_filtered(user=request.user, status=Job.Status.SUCCEEDED, model=model).select_related(
                "calibration_file"
            )
        )
        if model
        else []
    )
    # Columns in the order the jobs were chosen (the order of ?jobs= in the address), else the list's order.
    by_id = {job.pk: job for job in candidates}
    wanted = list(dict.fromkeys(_int(value) for value in request.GET.getlist("jobs")))
    chosen = [by_id[pk] for pk in wanted if pk in by_id] if wanted else candidates
    chosen = chosen[:COMPARE_MAX_JOBS]

    # One row per metric any chosen job has; the baseline column takes the first job's baseline value.
    labels: dict[str, str] = {}
    baseline: dict[str, float | None] = {}
    higher_is_better: dict[str, bool] = {}
    per_job: list[dict[str, presentation.MetricRow]] = []
    for job in chosen:
        rows = {row.name: row for row in presentation.metric_rows(job.results)}
        per_job.append(rows)
        for name, row in rows.items():
            labels.setdefault(name, row.label)
            higher_is_better.setdefault(name, row.higher_is_better)
            if baseline.get(name) is None:
                baseline[name] = row.baseline
    metric_table = []
    for name, label in labels.items():
        cells = [rows.get(name) for rows in per_job]
        compressed = [cell.compressed if cell else None for cell in cells]
        best = _best_indexes(compressed, higher_is_better[name], presentation.metric_text)
        metric_table.append(
            {
                "label": label,
                "higher_is_better": higher_is_better[name],
                "baseline": baseline.get(name),
                "cells": [{"row": cell, "best": index in best} for index, cell in enumerate(cells)],
            }
        )
    columns = [
        {
            "job": job,
            "sizes": presentation.sizes(job.results),
            "calibration": _calibration_text(job),
            "evaluated": bool(per_job[index]),
        }
        for index, job in enumerate(chosen)
    ]
    sizes_after = [c["sizes"].after if c["sizes"] else None for c in columns]
    smallest = _best_indexes(sizes_after, higher_is_better=False, shown=size_text)
    for index, column in enumerate(columns):
        column["smallest"] = index in smallest
    points = []
    before = next((c["sizes"].before for c in columns if c["sizes"]), None)
    if before:
        points.append(charts.Point(label="baseline", size_bytes=before, quality=100.0, baseline=True))
    candidates_on_plane = _points_on_plane(columns)
    floor = _floor_percent(request, chosen)
    recommended = trials.recommendation(candidates_on_plane, floor)
    frontier = trials.frontier(candidates_on_plane)
    for point in candidates_on_plane:
        points.append(
            charts.Point(
                label=point.label, size_bytes=point.size_bytes, quality=point.recovery, recommended=point is recommended
            )
        )
    context = {
        "models": models,
        "model": model,
        "candidates": candidates,
        "chosen_ids": {job.pk for job in chosen},
        "columns": columns,
        "metric_table": metric_table,
        "baseline_size": before,
        "recovery_heading": presentation.headline_heading([job.results for job in chosen]),
        "chart": _size_quality_chart(points, frontier, floor),
        "floor": floor,
        "recommended": recommended,
        "frontier": frontier,
    }
    return render(request, "frontend/compare.html", context)
