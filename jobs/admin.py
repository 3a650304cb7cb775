"""Operators' view: jobs with filters, search and bulk actions (the same services the app uses), and a
queue page showing the workers online, what each runs, the queue lengths and the waiting jobs in order."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ActionForm
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from engine.errors import EngineError
from engine.units import duration_text, size_text
from jobs import selectors
from jobs.models import CalibrationDataset, HubPush, HubToken, Job, WorkerNode
from jobs.ratelimit import RateLimited
from jobs.services import lifecycle, submissions
from jobs.services.errors import JobStateError


class JobActionForm(ActionForm):
    priority = forms.TypedChoiceField(
        choices=[("", "---")] + [(str(p), str(p)) for p in range(9, -1, -1)],
        coerce=int,
        empty_value=None,
        required=False,
        label="New priority (9 runs first)",
    )


class PresetFilter(admin.SimpleListFilter):
    """The presets the jobs used, and "custom recipe" for those without one (the plain field filter drew
    their link with an empty name: a link a screen reader cannot name)."""

    title = "preset"
    parameter_name = "preset"
    CUSTOM = "custom"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        presets = model_admin.get_queryset(request).order_by("preset").values_list("preset", flat=True).distinct()
        return [(preset or self.CUSTOM, preset or "custom recipe") for preset in presets]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Job]) -> QuerySet[Job]:
        if self.value() is None:
            return queryset
        return queryset.filter(preset="" if self.value() == self.CUSTOM else self.value())


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    action_form = JobActionForm
    actions = ["cancel_jobs", "retry_jobs", "change_priority"]
    list_display = [
        "id", "owner", "model_source", "recipe_label", "status", "progress", "priority", "device_class",
        "queue_position_display", "worker", "created_at", "duration",
    ]  # fmt: skip
    list_filter = [
        "status",
        PresetFilter,
        ("owner", admin.RelatedOnlyFieldListFilter),
        "device_class",
        "queue",
        "calibration_kind",
    ]
    list_select_related = ["owner"]
    search_fields = ["=id", "model_source", "preset", "owner__username", "owner__email", "error", "celery_task_id"]
    date_hierarchy = "created_at"
    ordering = ["-created_at"]
    list_per_page = 50
    readonly_fields = [f.name for f in Job._meta.fields] + ["recent_log", "results_table", "manifest_table"]
    fieldsets = [
        ("Request", {"fields": [
            "owner", "model_source", "model_revision", "preset", "recipe_yaml", "resolved_recipe",
            "calibration_kind", "calibration_file", "calibration_hub_dataset", "calibration_split",
            "calibration_column", "calibration_samples", "calibration_max_seq_len", "evaluation",
            "ignore_indivisible", "priority", "device_class", "gpus", "spec_fingerprint", "retry_of", "attempt",
        ]}),
        ("State", {"fields": [
            "status", "stage", "message", "step", "total", "percent", "error", "created_at", "started_at",
            "finished_at", "heartbeat_at", "celery_task_id", "queue", "worker", "requeue_count",
        ]}),
        ("Output", {"fields": ["results_table", "artifacts_path", "manifest_table", "recent_log"]}),
    ]  # fmt: skip

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # jobs are submitted through the form or the API, where preflight runs

    @admin.display(description="Progress")
    def progress(self, job: Job) -> str:
        if job.status == Job.Status.RUNNING:
            step = f" {job.step}/{job.total}" if job.step and job.total else ""
            return f"{job.stage}{step} ({job.percent or 0:.0f} %)"
        return job.get_stage_display() if job.status == Job.Status.QUEUED else ""

    @admin.display(description="Place in queue")
    def queue_position_display(self, job: Job) -> int | None:
        return getattr(job, "queue_place", None)  # set for the whole page at once in get_changelist_instance

    def get_changelist_instance(self, request: HttpRequest):
        """The list's rows get their place in the queue from one query, not one query per row."""
        changelist = super().get_changelist_instance(request)
        if any(job.status == Job.Status.QUEUED for job in changelist.result_list):
            positions = selectors.queue_positions()
            for job in changelist.result_list:
                job.queue_place = positions.get(job.pk)
        return changelist

    @admin.display(description="Results")
    def results_table(self, job: Job) -> SafeString:
        return readable_json(job.results)

    @admin.display(description="Manifest")
    def manifest_table(self, job: Job) -> SafeString:
        return readable_json(job.manifest)

    @admin.display(description="Duration")
    def duration(self, job: Job) -> str:
        return duration_text(job.duration_s)

    @admin.display(description="Latest log lines")
    def recent_log(self, job: Job) -> str:
        lines = list(job.log_lines.order_by("-id")[:40])[::-1]
        return format_html(
            '<pre style="max-height:30em;overflow:auto;white-space:pre-wrap">{}</pre>',
            format_html_join("\n", "{} {}", ((line.created_at.strftime("%H:%M:%S"), line.text) for line in lines)),
        )

    @admin.action(description="Cancel the selected jobs", permissions=["change"])
    def cancel_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        done, skipped = 0, []
        for job in queryset:
            try:
                lifecycle.job_cancel(job=job, by=request.user)
                done += 1
            except JobStateError:
                skipped.append(str(job.pk))
        self._report(request, f"Cancelled {done} job(s).", skipped, "already finished")

    @admin.action(description="Retry the selected jobs (new linked jobs)", permissions=["change"])
    def retry_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        created, skipped = [], []
        for job in queryset.select_related("owner", "calibration_file"):
            try:
                created.append(str(submissions.job_retry(job=job).pk))
            except JobStateError:
                skipped.append(str(job.pk))
            except (EngineError, RateLimited) as exc:  # preflight, or the owner's rate or quota
                self.message_user(request, f"Job {job.pk} cannot be retried: {exc.message}", messages.ERROR)
        self._report(
            request,
            f"Queued {len(created)} retry job(s): {', '.join(created) or '-'}.",
            skipped,
            "not failed or cancelled",
        )

    @admin.action(description="Change the priority of the selected queued jobs", permissions=["change"])
    def change_priority(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        form = JobActionForm(request.POST)
        priority = form.fields["priority"].clean(request.POST.get("priority", ""))
        if priority is None:
            self.message_user(request, "Choose the new priority next to the action.", messages.WARNING)
            return
        moved, skipped = 0, []
        for job in queryset:
            if lifecycle.job_set_priority(job=job, priority=priority):
                moved += 1
            else:
                skipped.append(str(job.pk))
        self._report(request, f"Set priority {priority} on {moved} queued job(s).", skipped, "not queued")

    def _report(self, request: HttpRequest, text: str, skipped: list[str], why: str) -> None:
        self.message_user(request, text, messages.SUCCESS)
        if skipped:
            self.message_user(request, f"Skipped ({why}): {', '.join(skipped)}.", messages.WARNING)

    def get_urls(self):
        return [
            path("queue/", self.admin_site.admin_view(self.queue_view), name="jobs_job_queue"),
            path("queue/workers/", self.admin_site.admin_view(self.workers_view), name="jobs_job_queue_workers"),
            *super().get_urls(),
        ]

    def queue_view(self, request: HttpRequest) -> HttpResponse:
        context = {
            **self.admin_site.each_context(request),
            "title": "Queue and workers",
            "opts": self.model._meta,
            "overview": selectors.queue_overview(),
            # What the workers last reported: asking them waits up to a second, so only the button asks.
            "workers": selectors.worker_overview(ask=False)[0],
            "changelist_url": reverse("admin:jobs_job_changelist"),
        }
        return TemplateResponse(request, "admin/jobs/job/queue.html", context)

    def workers_view(self, request: HttpRequest) -> HttpResponse:
        """The workers table as the workers answer now (up to a second): the queue page's "Ask the workers"
        button puts it in place of the registry's table; without the script the button is a link here."""
        workers, error = selectors.worker_overview()
        context = {"workers": workers, "error": error, "asked": True}
        if request.headers.get("X-Requested-With") == "fetch":  # the queue page's script inserts the table
            return TemplateResponse(request, "admin/jobs/job/_workers.html", context)
        context.update(self.admin_site.each_context(request), title="Workers online", opts=self.model._meta)
        return TemplateResponse(request, "admin/jobs/job/workers.html", context)


# The admin's home page links to the queue page (the template adds it above the list of models).
admin.site.index_template = "admin/jobs/index.html"

_MAX_ROWS = 30


def readable_json(value: Any) -> SafeString:
    """Stored JSON (results, manifest) as nested tables an operator can read; long lists are cut."""
    if value is None or value == {} or value == []:
        return format_html('<span class="quiet">{}</span>', "none")
    return _json_html(value)


def _json_html(value: Any) -> SafeString:
    if isinstance(value, dict):
        rows = format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", ((k, _json_html(v)) for k, v in value.items()))
        return format_html('<table class="json-table"><tbody>{}</tbody></table>', rows)
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        columns = list(dict.fromkeys(key for item in value[:_MAX_ROWS] for key in item))
        head = format_html_join("", "<th>{}</th>", ((c,) for c in columns))
        body = format_html_join(
            "",
            "<tr>{}</tr>",
            (
                (format_html_join("", "<td>{}</td>", ((_json_html(item.get(c, "")),) for c in columns)),)
                for item in value[:_MAX_ROWS]
            ),
        )
        more = (
            f"{len(value) - _MAX_ROWS} more rows (all of them: the API's results endpoint)"
            if len(value) > _MAX_ROWS
            else ""
        )
        return format_html(
            '<table class="json-table"><thead><tr>{}</tr></thead><tbody>{}</tbody></table>{}',
            head,
            body,
            format_html('<p class="help">{}</p>', more) if more else "",
        )
    if isinstance(value, list):
        shown = ", ".join(_scalar(item) for item in value[:_MAX_ROWS])
        return format_html("{}{}", shown, f" … ({len(value)} in all)" if len(value) > _MAX_ROWS else "")
    if isinstance(value, str) and "\n" in value:
        return format_html('<pre style="white-space:pre-wrap;margin:0">{}</pre>', value)
    return format_html("{}", _scalar(value))


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


@admin.register(CalibrationDataset)
class CalibrationDatasetAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "owner", "rows", "size_bytes", "created_at"]
    list_filter = [("owner", admin.RelatedOnlyFieldListFilter)]
    list_select_related = ["owner"]
    search_fields = ["name", "owner__username", "sha256"]
    readonly_fields = ["owner", "file", "sha256", "size_bytes", "rows", "created_at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(HubToken)
class HubTokenAdmin(admin.ModelAdmin):
    """Operators see whose hub token is stored and may delete one; never the token (only its hint)."""

    list_display = ["owner", "hint", "endpoint", "created_at", "updated_at"]
    list_select_related = ["owner"]
    search_fields = ["owner__username"]
    fields = readonly_fields = ["owner", "hint", "endpoint", "created_at", "updated_at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: HubToken | None = None) -> bool:
        return False


@admin.register(HubPush)
class HubPushAdmin(admin.ModelAdmin):
    list_display = ["id", "job", "owner", "repo_id", "status", "created_at", "finished_at"]
    list_filter = ["status", ("owner", admin.RelatedOnlyFieldListFilter)]
    list_select_related = ["owner", "job"]
    search_fields = ["repo_id", "owner__username"]
    readonly_fields = [field.name for field in HubPush._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(WorkerNode)
class WorkerNodeAdmin(admin.ModelAdmin):
    """The workers' registry, read-only: deleting a node forgets one that is gone for good (routing then no
    longer waits for it); a running worker announces itself again at its next heartbeat."""

    list_display = ["hostname", "node", "online", "gpu_count", "host_ram", "disk", "queues", "heartbeat_at"]
    search_fields = ["hostname", "node"]
    readonly_fields = [f.name for f in WorkerNode._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # workers register themselves

    def has_change_permission(self, request: HttpRequest, obj: WorkerNode | None = None) -> bool:
        return False

    @admin.display(boolean=True, description="Online")
    def online(self, node: WorkerNode) -> bool:
        return node.is_online()

    @admin.display(description="GPUs")
    def gpu_count(self, node: WorkerNode) -> int:
        return len(node.gpus)

    @admin.display(description="Host memory")
    def host_ram(self, node: WorkerNode) -> str:
        return size_text(node.host_ram_bytes)

    @admin.display(description="Disk free")
    def disk(self, node: WorkerNode) -> str:
        return size_text(node.disk_free_bytes)
