"""API shapes. Input serializers validate a request's form; the services decide what it means.

Status, progress, results and artifacts are read-only: only the workers (through jobs.services) set them.
"""

from __future__ import annotations

import copy

from django.urls import reverse
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from engine.limits import (
    CALIBRATION_COLUMN,
    CALIBRATION_MAX_SEQ_LEN,
    CALIBRATION_SAMPLES,
    CALIBRATION_SPLIT,
    EVALUATION_LIMIT,
    PRIORITY,
    SEARCH_MAX_TRIALS,
)
from engine.presets import MAX_RECIPE_BYTES, PRESETS
from engine.spec import BUILTIN_MODEL
from engine.submission import FLOOR_METRICS
from jobs import selectors
from jobs.hub_tokens import MAX_TOKEN_CHARS, MIN_TOKEN_CHARS
from jobs.inputs import JobInput, api_calibration
from jobs.models import CalibrationDataset, HubPush, HubToken, Job, JobLogLine

# One choice set for the preset fields (the job's preset and a sweep's): one enum in the OpenAPI schema.
PRESET_CHOICES = sorted(PRESETS)
# Fields bound to a field of their own (a child, nested fields): copied whole for each serializer instance.
_PARENT_FIELDS = (
    serializers.BaseSerializer,
    serializers.ListField,
    serializers.DictField,
    serializers.ManyRelatedField,
)


def fresh_fields(fields: dict[str, serializers.Field]) -> dict[str, serializers.Field]:
    """Unbound copies of a serializer's fields for one instance (a request's serializer binds them to itself).

    DRF deep-copies every field, rebuilding each from its arguments; that was a tenth of a submission's CPU.
    What bind() sets lands on the copy, so a leaf field needs only a shallow copy; a field whose children are
    bound to it is still deep-copied.
    """
    return {
        name: copy.deepcopy(field) if isinstance(field, _PARENT_FIELDS) else copy.copy(field)
        for name, field in fields.items()
    }


class InputSerializer(serializers.Serializer):
    """A request's form, with its fields copied by fresh_fields (the submission's serializers)."""

    def get_fields(self) -> dict[str, serializers.Field]:
        return fresh_fields(self._declared_fields)


class CalibrationInputSerializer(InputSerializer):
    kind = serializers.ChoiceField(choices=Job.CalibrationKind.choices, default=Job.CalibrationKind.BUILTIN)
    dataset_id = serializers.IntegerField(
        required=False, allow_null=True, help_text="An uploaded calibration file's id (kind 'upload')."
    )
    hub_dataset = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        max_length=200,
        help_text="kind 'hub': a Hugging Face dataset id, namespace/name (never a path).",
    )
    split = serializers.CharField(required=False, default=CALIBRATION_SPLIT, max_length=100)
    column = serializers.CharField(required=False, default=CALIBRATION_COLUMN, max_length=100)
    samples = serializers.IntegerField(**CALIBRATION_SAMPLES.field_bounds(), default=CALIBRATION_SAMPLES.default)
    max_seq_len = serializers.IntegerField(
        **CALIBRATION_MAX_SEQ_LEN.field_bounds(), default=CALIBRATION_MAX_SEQ_LEN.default
    )


class EvaluationInputSerializer(InputSerializer):
    offline = serializers.BooleanField(default=True, help_text="Perplexity and the offline checks.")
    tasks = serializers.ListField(
        child=serializers.CharField(max_length=200),
        required=False,
        default=list,
        max_length=50,
        help_text="lm-eval task names; unknown names are refused.",
    )
    limit = serializers.IntegerField(
        **EVALUATION_LIMIT.field_bounds(), required=False, allow_null=True, default=EVALUATION_LIMIT.default
    )
    backend = serializers.ChoiceField(choices=["hf", "vllm"], default="hf")


class FloorInputSerializer(InputSerializer):
    metric = serializers.ChoiceField(choices=sorted(FLOOR_METRICS), default="perplexity_recovery")
    at_least = serializers.FloatField(
        min_value=0.0, max_value=1.0, help_text="A fraction of the baseline's score: 0.99 is 99 % recovery."
    )


class BudgetInputSerializer(InputSerializer):
    max_trials = serializers.IntegerField(**SEARCH_MAX_TRIALS.field_bounds(), default=SEARCH_MAX_TRIALS.default)
    max_seconds = serializers.FloatField(min_value=1, required=False, allow_null=True, default=None)
    max_size_ratio = serializers.FloatField(
        min_value=0.01, max_value=1.0, required=False, allow_null=True, default=None,
        help_text="The largest checkpoint worth trying, as a fraction of the original's size.",
    )  # fmt: skip


class SearchInputSerializer(InputSerializer):
    floor = FloorInputSerializer(required=False, allow_null=True, default=None)
    budget = BudgetInputSerializer(required=False)
    presets = serializers.ListField(
        child=serializers.ChoiceField(choices=PRESET_CHOICES),
        required=False,
        default=list,
        max_length=len(PRESETS),
        help_text="A sweep: further presets tried on the same load of the model, besides `preset`.",
    )

    def validate(self, attrs: dict) -> dict:
        if not attrs.get("floor") and not attrs.get("presets"):
            raise serializers.ValidationError("Give a floor, presets to sweep, or both.")
        attrs["budget"] = attrs.get("budget") or BudgetInputSerializer().to_internal_value({})
        return attrs


class JobCreateSerializer(InputSerializer):
    model = serializers.CharField(default=BUILTIN_MODEL, max_length=500, help_text="Built-in name or hub id.")
    revision = serializers.CharField(required=False, allow_blank=True, default="", max_length=200)
    preset = serializers.ChoiceField(
        choices=PRESET_CHOICES,
        required=False,
        allow_blank=True,
        default="",
        help_text="A preset's name. A job needs exactly one of preset and recipe_yaml.",
    )
    recipe_yaml = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        max_length=MAX_RECIPE_BYTES,
        help_text=(
            "A custom llm-compressor recipe instead of a preset (exactly one of the two): YAML of at most 64 KB, "
            "without aliases, Python tags or code."
        ),
    )
    calibration = CalibrationInputSerializer(required=False)
    evaluation = EvaluationInputSerializer(required=False, allow_null=True, default=None)
    search = SearchInputSerializer(
        required=False,
        allow_null=True,
        default=None,
        help_text=(
            "A floor search and/or a sweep: the smallest checkpoint whose perplexity recovery is at least "
            "floor.at_least, trying the presets, then keeping the most sensitive layers in bf16; every trial is in "
            "results.search."
        ),
    )
    ignore_indivisible = serializers.BooleanField(default=False)
    priority = serializers.IntegerField(
        **PRIORITY.field_bounds(), default=PRIORITY.default, help_text=f"{PRIORITY.most} first."
    )
    device_class = serializers.ChoiceField(choices=Job.DeviceClass.choices, required=False)
    gpus = serializers.IntegerField(
        min_value=1,
        required=False,
        allow_null=True,
        default=None,
        help_text="GPUs for a GPU job (tensor parallel evaluation); null: as many as the memory plan needs.",
    )
    force = serializers.BooleanField(
        default=False, help_text="Run even when an identical job of yours already succeeded."
    )

    def validate(self, attrs: dict) -> dict:
        if bool(attrs.get("preset")) == bool(attrs.get("recipe_yaml", "").strip()):
            raise serializers.ValidationError({"preset": "Give either a preset or a custom recipe_yaml."})
        calibration = attrs.get("calibration") or CalibrationInputSerializer().to_internal_value({})
        dataset = None
        if calibration["kind"] == Job.CalibrationKind.UPLOAD:
            user = self.context["request"].user
            dataset = CalibrationDataset.objects.filter(pk=calibration.get("dataset_id"), owner=user).first()
            if dataset is None:
                raise serializers.ValidationError({"calibration": "dataset_id must be one of your uploaded files."})
        if calibration["kind"] == Job.CalibrationKind.HUB and not calibration.get("hub_dataset"):
            raise serializers.ValidationError({"calibration": "hub_dataset is required for kind 'hub'."})
        attrs["calibration"], attrs["calibration_file"] = calibration, dataset
        return attrs

    def to_job_input(self) -> JobInput:
        return JobInput.from_api(self.validated_data, calibration_file=self.validated_data["calibration_file"])


class JobSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.get_username", read_only=True)
    model = serializers.CharField(source="model_source", read_only=True)
    revision = serializers.CharField(source="model_revision", read_only=True)
    calibration = serializers.SerializerMethodField()
    queue_position = serializers.SerializerMethodField()
    links = serializers.SerializerMethodField()
    duplicate = serializers.SerializerMethodField(
        help_text="True when this create request was answered with an earlier identical succeeded job."
    )

    class Meta:
        model = Job
        fields = [
            "id", "owner", "status", "stage", "message", "step", "total", "percent", "error",
            "model", "revision", "model_commit", "model_facts", "preset", "recipe_yaml", "resolved_recipe",
            "calibration", "evaluation", "search",
            "ignore_indivisible", "priority", "device_class", "gpus", "queue", "queue_position", "worker",
            "attempt", "requeue_count", "retry_of", "created_at", "started_at", "finished_at",
            "heartbeat_at", "duration_s", "results", "manifest", "links", "duplicate",
        ]  # fmt: skip
        read_only_fields = fields

    def get_fields(self) -> dict[str, serializers.Field]:
        # DRF builds a ModelSerializer's fields from the model for each instance (each response): built once
        # per class here, and fresh copies for each instance.
        if "_built_fields" not in type(self).__dict__:
            type(self)._built_fields = super().get_fields()
        return fresh_fields(type(self)._built_fields)

    @extend_schema_field(serializers.DictField())
    def get_calibration(self, job: Job) -> dict:
        return api_calibration(job)

    def get_queue_position(self, job: Job) -> int | None:
        if self.parent is None:  # one job: one COUNT, whatever the length of the queue
            return selectors.queue_position(job=job)
        # Computed once per response for all waiting jobs: a list page costs the same queries at any length.
        if "queue_positions" not in self.context:
            self.context["queue_positions"] = selectors.queue_positions()
        return self.context["queue_positions"].get(job.pk)

    @extend_schema_field(serializers.DictField(child=serializers.CharField()))
    def get_links(self, job: Job) -> dict:
        request = self.context.get("request")
        path = reverse("api:job-detail", kwargs={"pk": job.pk})
        # The job's actions are the router's paths under its own (one reverse() per job: a list page has 25).
        detail = request.build_absolute_uri(path) if request else path
        links = {"self": detail, "logs": f"{detail}logs/", "page": f"/jobs/{job.pk}/"}
        if job.status == Job.Status.SUCCEEDED:
            links.update(archive=f"{detail}archive/", manifest=f"{detail}manifest/", results=f"{detail}results/")
            links["files"] = detail + "files/{path}"
        return links

    def get_duplicate(self, job: Job) -> bool:
        return bool(self.context.get("duplicate"))


class JobSummarySerializer(JobSerializer):
    """A job in a list: without its recipes, results and manifest, which can be large (see the job itself)."""

    class Meta(JobSerializer.Meta):
        fields = [
            name
            for name in JobSerializer.Meta.fields
            if name not in ("recipe_yaml", "resolved_recipe", "results", "manifest")
        ]
        read_only_fields = fields


class JobLogLineSerializer(serializers.ModelSerializer):
    class Meta:
        model = JobLogLine
        fields = ["id", "created_at", "stage", "text"]


class PresetSerializer(serializers.Serializer):
    name = serializers.CharField()
    description = serializers.CharField()
    needs_calibration = serializers.BooleanField()
    weight_quantization = serializers.CharField(allow_null=True)
    activation_quantization = serializers.CharField(allow_null=True)
    sparsity = serializers.CharField(allow_null=True)
    method = serializers.CharField()
    group_size = serializers.IntegerField(allow_null=True)
    notes = serializers.ListField(child=serializers.CharField())


class CalibrationDatasetSerializer(serializers.ModelSerializer):
    file = serializers.FileField(write_only=True, help_text='A JSONL file of {"text"} or {"messages"} rows.')
    name = serializers.CharField(required=False, allow_blank=True, default="", max_length=200)

    class Meta:
        model = CalibrationDataset
        fields = ["id", "name", "file", "sha256", "size_bytes", "rows", "created_at"]
        read_only_fields = ["sha256", "size_bytes", "rows", "created_at"]


class HubTokenInputSerializer(serializers.Serializer):
    token = serializers.CharField(
        write_only=True,
        min_length=MIN_TOKEN_CHARS,
        max_length=MAX_TOKEN_CHARS,
        trim_whitespace=True,
        help_text="A hub token with write access (hf_...).",
    )
    endpoint = serializers.CharField(
        required=False, allow_blank=True, default="", max_length=200, help_text="Empty: the server's hub."
    )


class HubTokenSerializer(serializers.ModelSerializer):
    """The stored token as anyone may see it: its hint, never the token."""

    class Meta:
        model = HubToken
        fields = ["hint", "endpoint", "created_at", "updated_at"]
        read_only_fields = fields


class HubPushCreateSerializer(serializers.Serializer):
    repo_id = serializers.CharField(max_length=200, help_text="namespace/name on the hub; made when missing.")
    private = serializers.BooleanField(default=True, help_text="A new repository is private unless false.")


class HubPushSerializer(serializers.ModelSerializer):
    repo_url = serializers.CharField(read_only=True)

    class Meta:
        model = HubPush
        fields = [
            "id", "job", "repo_id", "private", "status", "endpoint", "repo_url", "commit_sha", "commit_url",
            "error", "created_at", "started_at", "finished_at",
        ]  # fmt: skip
        read_only_fields = fields
