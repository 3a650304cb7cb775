"""The Job record (the state machine of one compression run), its log lines, uploaded calibration data and the
workers' registry.

Only jobs.services changes a Job's status, and only from the expected state (conditional UPDATEs, by the
table in jobs.services.transitions), so a late message from a killed or cancelled task changes nothing.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from pathlib import PurePosixPath

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models.fields.json import KT
from django.db.models.functions import Cast
from django.utils import timezone

from engine.limits import CALIBRATION_COLUMN, CALIBRATION_MAX_SEQ_LEN, CALIBRATION_SAMPLES, CALIBRATION_SPLIT, PRIORITY
from engine.spec import BUILTIN_MODEL
from engine.spec import Stage as EngineStage


def calibration_upload_to(instance: CalibrationDataset, filename: str) -> str:
    """Uploaded files live under calibration/<owner id>/ with a random name (never the user's path)."""
    return f"calibration/{instance.owner_id}/{uuid.uuid4().hex}.jsonl"


class CalibrationDataset(models.Model):
    """A JSONL file of {"text"} or {"messages"} rows a user uploaded for calibration."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="calibration_datasets")
    name = models.CharField(max_length=200)
    file = models.FileField(upload_to=calibration_upload_to, max_length=300)
    sha256 = models.CharField(max_length=64)
    size_bytes = models.PositiveBigIntegerField(default=0)
    rows = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.rows} rows)"


class Job(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    ACTIVE = frozenset({Status.QUEUED, Status.RUNNING})
    TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})

    # The stages of a run with their labels, as engine.spec.Stage declares them (the pages take them from here).
    Stage = models.TextChoices("Stage", [(stage.name, (stage.value, stage.label)) for stage in EngineStage])

    class DeviceClass(models.TextChoices):
        GPU = "gpu", "GPU"
        CPU = "cpu", "CPU"

    class CalibrationKind(models.TextChoices):
        BUILTIN = "builtin", "Built-in text"
        UPLOAD = "upload", "Uploaded JSONL file"
        HUB = "hub", "Hugging Face dataset"
        NONE = "none", "None (data-free presets)"

    # Higher runs first (0 lowest, 9 highest); the task's broker priority is the reverse
    # (jobs.services.broker.broker_priority).
    PRIORITY_LOW, PRIORITY_NORMAL, PRIORITY_HIGH = PRIORITY.least, PRIORITY.default, PRIORITY.most

    # No index of its own: job_owner_recent and job_owner_quota begin with it.
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs", db_index=False)

    # What to do.
    model_source = models.CharField(max_length=500, default=BUILTIN_MODEL)
    model_revision = models.CharField(max_length=200, blank=True)
    preset = models.CharField(max_length=64, blank=True)
    recipe_yaml = models.TextField(blank=True, help_text="A custom llm-compressor recipe (instead of a preset).")
    resolved_recipe = models.TextField(blank=True, help_text="The recipe recorded at submission; what the worker runs.")
    calibration_kind = models.CharField(max_length=16, choices=CalibrationKind.choices, default=CalibrationKind.BUILTIN)
    # An owner may delete an upload no active job uses (jobs.services.storage.calibration_dataset_delete): the
    # jobs that ended keep their record, without the file.
    calibration_file = models.ForeignKey(
        CalibrationDataset, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs"
    )
    calibration_hub_dataset = models.CharField(max_length=300, blank=True)
    calibration_split = models.CharField(max_length=100, default=CALIBRATION_SPLIT)
    calibration_column = models.CharField(max_length=100, default=CALIBRATION_COLUMN)
    calibration_samples = models.PositiveIntegerField(default=CALIBRATION_SAMPLES.default)
    calibration_max_seq_len = models.PositiveIntegerField(default=CALIBRATION_MAX_SEQ_LEN.default)
    evaluation = models.JSONField(null=True, blank=True, help_text="EvaluationSpec fields, or null for none.")
    ignore_indivisible = models.BooleanField(default=False)
    priority = models.PositiveSmallIntegerField(
        default=PRIORITY_NORMAL, validators=[MinValueValidator(PRIORITY_LOW), MaxValueValidator(PRIORITY_HIGH)]
    )
    device_class = models.CharField(max_length=8, choices=DeviceClass.choices, default=DeviceClass.GPU)
    gpus = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="GPUs the job asks for; empty: as many as the memory plan needs."
    )
    search = models.JSONField(
        null=True, blank=True, help_text="A floor search or sweep (floor, budget, presets), or null for one run."
    )
    spec_fingerprint = models.CharField(max_length=64, blank=True)
    # A hub model's revision as the commit it named at submission: the worker downloads exactly that one.
    model_commit = models.CharField(max_length=40, blank=True)
    # The model's metadata seen at submission (engine.model_sources.ModelFacts.summary): parameters, dtypes, bytes.
    model_facts = models.JSONField(null=True, blank=True)

    # Where it stands.
    # No index of its own: job_queue_order begins with it.
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    stage = models.CharField(max_length=16, choices=Stage.choices, default=Stage.WAITING)
    message = models.CharField(max_length=500, blank=True)
    step = models.PositiveIntegerField(null=True, blank=True)
    total = models.PositiveIntegerField(null=True, blank=True)
    percent = models.FloatField(null=True, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    # The queue and the worker.
    celery_task_id = models.CharField(max_length=64, blank=True)
    queue = models.CharField(max_length=200, blank=True)  # a node's own queue is named after its worker
    worker = models.CharField(max_length=200, blank=True)
    attempt = models.PositiveSmallIntegerField(default=1, help_text="1 for a new job, +1 for each retry.")
    requeue_count = models.PositiveSmallIntegerField(default=0, help_text="Times the reaper re-queued it.")
    retry_of = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="followups",
        help_text="The job this one retries or was cloned from.",
    )

    # What it produced.
    results = models.JSONField(null=True, blank=True)
    # The checkpoint's size from the results, kept by the database on every write (a save or an update()): the
    # stored-bytes quota adds it up at each submission, from the index below instead of every job's JSON.
    checkpoint_bytes = models.GeneratedField(
        expression=Cast(KT("results__size_after_bytes"), models.BigIntegerField()),
        output_field=models.BigIntegerField(null=True),
        db_persist=True,
    )
    artifacts_path = models.CharField(max_length=300, blank=True, help_text="Checkpoint folder under MEDIA_ROOT.")
    manifest = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["status", "queue", "-priority", "created_at"], name="job_queue_order"),
            models.Index(fields=["owner", "-created_at"], name="job_owner_recent"),
            # The quotas (active jobs, stored bytes) of one owner, from the index alone on PostgreSQL.
            models.Index(fields=["owner", "status", "checkpoint_bytes"], name="job_owner_quota"),
            # Equality lookups only: a CharField's db_index would add a second, LIKE-only index on PostgreSQL
            # (varchar_pattern_ops) that nothing queries and every INSERT writes.
            models.Index(fields=["preset"], name="job_preset"),
            models.Index(fields=["spec_fingerprint"], name="job_fingerprint"),
            models.Index(fields=["celery_task_id"], name="job_task_id"),
        ]

    def __str__(self) -> str:
        return f"Job {self.pk} ({self.model_source}, {self.preset or 'custom recipe'}, {self.status})"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL

    @property
    def recipe_label(self) -> str:
        return self.preset or "custom recipe"

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or self.heartbeat_at or self.started_at
        return (end - self.started_at).total_seconds()

    def artifacts_relpath(self) -> str:
        """Where this job's checkpoint goes, relative to MEDIA_ROOT (a fresh folder per job)."""
        return str(PurePosixPath("jobs") / str(self.pk) / "checkpoint")


class JobLogLine(models.Model):
    """One log line of a job. The id is the cursor for incremental fetches; old lines are pruned."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="log_lines")
    created_at = models.DateTimeField(auto_now_add=True)
    stage = models.CharField(max_length=16, blank=True)
    text = models.TextField()

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["job", "id"], name="joblog_job_cursor")]

    def __str__(self) -> str:
        return self.text[:80]


class HubToken(models.Model):
    """A user's Hugging Face hub token, encrypted at rest (jobs.hub_tokens); only its hint is ever shown."""

    owner = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="hub_token")
    encrypted_token = models.TextField(help_text="Fernet ciphertext; jobs.hub_tokens reads it.")
    hint = models.CharField(max_length=16, help_text='What pages show of the token: "hf_…abcd".')
    endpoint = models.CharField(
        max_length=200, blank=True, help_text="The hub it is for; empty: COMPRESSOR_HUB_ENDPOINT."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.owner} {self.hint}"


class HubPush(models.Model):
    """One upload of a succeeded job's checkpoint (with its card) to a hub repository (jobs.hub_push)."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Pushing"
        SUCCEEDED = "succeeded", "Pushed"
        FAILED = "failed", "Failed"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="hub_pushes")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="hub_pushes")
    repo_id = models.CharField(max_length=200)
    private = models.BooleanField(default=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    endpoint = models.CharField(max_length=200, blank=True, help_text="The hub it went to (set when it runs).")
    commit_sha = models.CharField(max_length=64, blank=True)
    commit_url = models.CharField(max_length=500, blank=True)
    error = models.TextField(blank=True)
    celery_task_id = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "hub pushes"  # the admin wrote "Hub pushs"

    def __str__(self) -> str:
        return f"Push of job {self.job_id} to {self.repo_id} ({self.status})"

    @property
    def repo_url(self) -> str:
        return f"{self.endpoint.rstrip('/')}/{self.repo_id}" if self.endpoint else ""


# --- the workers' registry: what each announced when it started (queues, GPUs, host memory, disk, its caps)
# and its heartbeat. Written only by jobs.nodes; read by the routing at submission and the admin.
NODE_QUEUE_PREFIX = "node."


def own_queue(hostname: str) -> str:
    """The queue only this worker consumes."""
    return f"{NODE_QUEUE_PREFIX}{hostname}"


class WorkerNode(models.Model):
    hostname = models.CharField(max_length=200, unique=True, help_text="The Celery worker's name (-n), e.g. gpu0@host.")
    node = models.CharField(max_length=200, help_text="The machine's hostname.")
    queues = models.JSONField(default=list, help_text="The queues it consumes, its own included.")
    gpus = models.JSONField(default=list, help_text="Each GPU it may use: index, name, free memory (bytes).")
    host_ram_bytes = models.PositiveBigIntegerField(default=0, help_text="Host memory available to a job.")
    disk_free_bytes = models.PositiveBigIntegerField(default=0, help_text="Free disk where checkpoints go.")
    caps = models.JSONField(default=dict, help_text="The operator's caps (COMPRESSOR_WORKER_*, decimal MB).")
    capped = models.JSONField(default=list, help_text="Which figures a cap lowered.")
    started_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField()
    stopped_at = models.DateTimeField(null=True, blank=True, help_text="Set by a clean shutdown.")

    class Meta:
        ordering = ["hostname"]

    def __str__(self) -> str:
        return self.hostname

    @property
    def own_queue(self) -> str:
        return own_queue(self.hostname)

    def is_online(self, now: datetime | None = None) -> bool:
        """Running: not shut down, and a heartbeat younger than COMPRESSOR_NODE_OFFLINE_AFTER_S."""
        cutoff = (now or timezone.now()) - timedelta(seconds=settings.COMPRESSOR_NODE_OFFLINE_AFTER_S)
        return self.stopped_at is None and self.heartbeat_at >= cutoff
