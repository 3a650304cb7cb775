"""The new-job form. It checks the form's shape; the decisions (preflight) are jobs.services.submissions.job_submit's,
exactly as for the API. Errors the service raises are put back beside the field they concern."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm

from engine.limits import (
    CALIBRATION_COLUMN,
    CALIBRATION_MAX_SEQ_LEN,
    CALIBRATION_SAMPLES,
    CALIBRATION_SPLIT,
    EVALUATION_LIMIT,
    PRIORITY,
    SEARCH_MAX_TRIALS,
)
from engine.presets import PRESETS
from engine.spec import BUILTIN_MODEL
from engine.submission import IGNORE_INDIVISIBLE_LABEL
from jobs import selectors
from jobs.auth import login_wait_s
from jobs.inputs import JobInput, request_field
from jobs.models import Job
from jobs.services.policy import max_priority_for

CUSTOM_RECIPE = "custom"
# Request fields the form shows as they are, under the same name (the others are mapped in to_job_input).
_SAME_NAMES = (
    "calibration_kind",
    "calibration_split",
    "calibration_column",
    "calibration_samples",
    "calibration_max_seq_len",
    "ignore_indivisible",
    "priority",
    "device_class",
    "gpus",
)
BUILTIN_MODELS = [(BUILTIN_MODEL, "SmolLM2-135M-Instruct: 135 M parameters, ships with the service")]


def _is_hub_id(text: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def preset_infos() -> list[dict[str, Any]]:
    """Each preset with what it needs, for the form's descriptions."""
    return [preset.summary() for preset in PRESETS.values()]


class JobForm(forms.Form):
    """What a person asks for. Field names are the page's; to_job_input() turns them into a JobInput."""

    SOURCE_BUILTIN, SOURCE_HUB, SOURCE_LOCAL = "builtin", "hub", "local"

    model_source = forms.ChoiceField(label="Where the model comes from", widget=forms.RadioSelect)
    builtin_model = forms.ChoiceField(label="Built-in model", choices=BUILTIN_MODELS, required=False)
    hub_id = forms.CharField(
        label="Hugging Face model id",
        required=False,
        max_length=500,
        help_text="For example meta-llama/Llama-3.1-8B-Instruct. The worker downloads it.",
    )
    revision = forms.CharField(
        label="Revision",
        required=False,
        max_length=200,
        help_text="A branch, tag or commit; empty for the default branch.",
    )
    local_path = forms.CharField(
        label="Local model folder",
        required=False,
        max_length=500,
        help_text="A folder on the workers with config.json and safetensors weights.",
    )

    preset = forms.ChoiceField(label="Compression preset", widget=forms.RadioSelect)
    recipe_yaml = forms.CharField(
        label="Custom llm-compressor recipe (YAML)",
        required=False,
        widget=forms.Textarea(attrs={"rows": 8, "spellcheck": "false"}),
        help_text="Used when the preset is “Custom recipe”.",
    )
    ignore_indivisible = forms.BooleanField(
        label=IGNORE_INDIVISIBLE_LABEL,
        required=False,
        help_text="Otherwise a preset with a group size refuses such a model.",
    )

    calibration_kind = forms.ChoiceField(
        label="Calibration data", widget=forms.RadioSelect, choices=Job.CalibrationKind.choices
    )
    calibration_upload = forms.FileField(
        label="Upload a JSONL file",
        required=False,
        help_text='One JSON object a line: {"text": ...} or {"messages": [...]}.',
        widget=forms.ClearableFileInput(attrs={"accept": ".jsonl,.json,application/jsonl,application/json"}),
    )
    calibration_dataset = forms.ModelChoiceField(
        label="…or one of your uploaded files", queryset=None, required=False, empty_label="(none)"
    )
    calibration_hub_dataset = forms.CharField(label="Hub dataset id", required=False, max_length=300)
    calibration_split = forms.CharField(label="Split", initial=CALIBRATION_SPLIT, max_length=100)
    calibration_column = forms.CharField(label="Text column", initial=CALIBRATION_COLUMN, max_length=100)
    calibration_samples = forms.IntegerField(
        label="Samples", initial=CALIBRATION_SAMPLES.default, **CALIBRATION_SAMPLES.field_bounds()
    )
    calibration_max_seq_len = forms.IntegerField(
        label="Tokens per sample", initial=CALIBRATION_MAX_SEQ_LEN.default, **CALIBRATION_MAX_SEQ_LEN.field_bounds()
    )

    evaluate_offline = forms.BooleanField(
        label="Offline suite: perplexity on held-out text and sample generations",
        required=False,
        initial=True,
    )
    evaluation_tasks = forms.CharField(
        label="lm-eval tasks",
        required=False,
        max_length=500,
        help_text="Comma-separated task names, for example gsm8k, arc_easy. Empty for none.",
    )
    evaluation_limit = forms.IntegerField(
        label="Examples per task",
        required=False,
        **EVALUATION_LIMIT.field_bounds(),
        help_text="Empty for the whole task.",
    )
    evaluation_backend = forms.ChoiceField(
        label="lm-eval backend",
        required=False,
        choices=[("hf", "Transformers (hf)"), ("vllm", "vLLM (GPU workers)")],
        initial="hf",
    )

    floor_percent = forms.FloatField(
        label="Quality floor: least recovery (%)",
        required=False,
        min_value=1,
        max_value=100,
        help_text="Search for the smallest checkpoint that keeps it (for example 99). Empty: no search.",
    )
    floor_metric = forms.ChoiceField(
        label="The floor is judged on",
        required=False,
        choices=[
            ("perplexity_recovery", "Perplexity on the held-out text"),
            ("task_recovery", "The lm-eval tasks above (their average recovery, hf backend)"),
        ],
        initial="perplexity_recovery",
    )
    sweep_presets = forms.MultipleChoiceField(
        label="Sweep: also try these presets",
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="One load of the model and one baseline for all; the compare page shows their frontier.",
    )
    search_max_trials = forms.IntegerField(
        label="Most trials", initial=SEARCH_MAX_TRIALS.default, **SEARCH_MAX_TRIALS.field_bounds(), required=False
    )
    search_max_seconds = forms.IntegerField(label="Most seconds", min_value=1, required=False)

    priority = forms.IntegerField(label="Priority", initial=PRIORITY.default, **PRIORITY.field_bounds())
    device_class = forms.ChoiceField(label="Worker", choices=Job.DeviceClass.choices)
    gpus = forms.TypedChoiceField(
        label="GPUs",
        required=False,
        coerce=int,
        empty_value=None,
        choices=[("", "As many as the memory plan needs"), *((n, str(n)) for n in (1, 2, 4, 8))],
        help_text="GPU jobs: evaluation and the vLLM check use them with tensor parallelism.",
    )
    force = forms.BooleanField(
        label="Run even if an identical job of mine already succeeded", required=False, initial=False
    )
    clone_of = forms.IntegerField(required=False, widget=forms.HiddenInput)

    def __init__(self, *args, user, calibration_datasets, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.user = user
        sources = [(self.SOURCE_BUILTIN, "Built-in model"), (self.SOURCE_HUB, "Hugging Face hub")]
        if settings.COMPRESSOR_ALLOW_LOCAL_PATHS:
            sources.append((self.SOURCE_LOCAL, "Local folder"))
        else:
            del self.fields["local_path"]
        self.fields["model_source"].choices = sources
        self.fields["preset"].choices = [(name, name) for name in PRESETS] + [(CUSTOM_RECIPE, "Custom recipe")]
        self.fields["sweep_presets"].choices = [(name, name) for name in PRESETS]
        self.fields["calibration_dataset"].queryset = calibration_datasets
        # The cap itself is the service's rule (job_submit refuses above it); the page only shows it.
        self.max_priority = max_priority_for(user)
        self.fields["priority"].widget.attrs.update(min=0, max=self.max_priority)
        self.fields["priority"].help_text = f"0 to {self.max_priority}; higher runs first."
        self.fields["device_class"].initial = selectors.default_device_class()

    # --- the form's own checks -----------------------------------------------------------------------------

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        # Fields of the parts the choices hide (the page's script hides them too) are not used: their errors
        # would point at nothing on the page, and must not stop the job.
        for name in self._unused_fields():
            self._errors.pop(name, None)
        source = data.get("model_source")
        if source == self.SOURCE_HUB and not data.get("hub_id", "").strip():
            self.add_error("hub_id", "Give the model's id on the hub, such as owner/name.")
        elif source == self.SOURCE_HUB and not _is_hub_id(data.get("hub_id", "").strip()):
            # Said with the other fields' errors, not after them (the service checks the id again, and more)
            self.add_error("hub_id", "Not a Hugging Face model id: write it as owner/name, such as Qwen/Qwen3-0.6B.")
        if source == self.SOURCE_LOCAL and not data.get("local_path", "").strip():
            self.add_error("local_path", "Give the folder's path on the workers.")
        if data.get("preset") == CUSTOM_RECIPE and not data.get("recipe_yaml", "").strip():
            self.add_error("recipe_yaml", "Paste a recipe, or choose a preset.")
        kind = data.get("calibration_kind")
        if (
            kind == Job.CalibrationKind.UPLOAD
            and not data.get("calibration_upload")
            and not data.get("calibration_dataset")
        ):
            self.add_error("calibration_upload", "Choose a JSONL file to upload, or one you uploaded before.")
        if kind == Job.CalibrationKind.HUB and not data.get("calibration_hub_dataset", "").strip():
            self.add_error("calibration_hub_dataset", "Give the dataset's id on the hub.")
        return data

    def _unused_fields(self) -> set[str]:
        """The fields the chosen model source, calibration kind and preset leave out (by the submitted choices;
        an unknown choice leaves nothing out)."""
        source, kind, preset = (self.data.get(name) for name in ("model_source", "calibration_kind", "preset"))
        sized = {"calibration_samples", "calibration_max_seq_len"}
        per_source = {
            self.SOURCE_BUILTIN: {"builtin_model"},
            self.SOURCE_HUB: {"hub_id", "revision"},
            self.SOURCE_LOCAL: {"local_path"},
        }
        per_kind = {
            Job.CalibrationKind.BUILTIN: sized,
            Job.CalibrationKind.UPLOAD: {"calibration_upload", "calibration_dataset"} | sized,
            Job.CalibrationKind.HUB: {"calibration_hub_dataset", "calibration_split", "calibration_column"} | sized,
            Job.CalibrationKind.NONE: set(),
        }
        unused: set[str] = set()
        for choice, fields in ((source, per_source), (kind, per_kind)):
            if choice in fields:
                unused |= set().union(*fields.values()) - fields[choice]
        if preset and preset != CUSTOM_RECIPE:
            unused.add("recipe_yaml")
        return unused & set(self.fields)

    def model_name(self) -> str:
        data = self.cleaned_data
        source = data["model_source"]
        if source == self.SOURCE_HUB:
            return data["hub_id"].strip()
        if source == self.SOURCE_LOCAL:
            return data["local_path"].strip()
        return data.get("builtin_model") or BUILTIN_MODEL

    def evaluation(self) -> dict[str, Any] | None:
        data = self.cleaned_data
        tasks = [t.strip() for t in data.get("evaluation_tasks", "").split(",") if t.strip()]
        if not data.get("evaluate_offline") and not tasks:
            return None
        return {
            "offline": bool(data.get("evaluate_offline")),
            "tasks": tasks,
            "limit": data.get("evaluation_limit"),
            "backend": data.get("evaluation_backend") or "hf",
        }

    def search(self) -> dict[str, Any] | None:
        """The floor search and sweep the form asks for (None: neither)."""
        data = self.cleaned_data
        floor, presets = data.get("floor_percent"), list(data.get("sweep_presets") or [])
        if floor is None and not presets:
            return None
        return {
            "floor": {"metric": data.get("floor_metric") or "perplexity_recovery", "at_least": floor / 100}
            if floor is not None
            else None,
            "budget": {"max_trials": data.get("search_max_trials") or 6, "max_seconds": data.get("search_max_seconds")},
            "presets": presets,
        }

    def to_job_input(self, *, calibration_file=None) -> JobInput:
        """The request this form describes (the inverse of initial_from)."""
        data = self.cleaned_data
        custom = data["preset"] == CUSTOM_RECIPE
        return JobInput(
            **{name: data[name] for name in _SAME_NAMES if name in data},
            model=self.model_name(),
            revision=data.get("revision", "").strip() if data["model_source"] == self.SOURCE_HUB else "",
            preset="" if custom else data["preset"],
            recipe_yaml=data["recipe_yaml"] if custom else "",
            calibration_file=calibration_file or data.get("calibration_dataset"),
            calibration_hub_dataset=data.get("calibration_hub_dataset", "").strip(),
            evaluation=self.evaluation(),
            search=self.search(),
        )

    @classmethod
    def initial_from(cls, request: JobInput) -> dict[str, Any]:
        """The form's values for a request ("clone and edit" starts from the old job's; the inverse of
        to_job_input)."""
        evaluation = request.evaluation or {}
        search = request.search or {}
        floor, budget = search.get("floor") or {}, search.get("budget") or {}
        builtin = request.model in dict(BUILTIN_MODELS)
        local = not builtin and request.model.startswith(("/", ".", "~"))
        source = cls.SOURCE_BUILTIN if builtin else cls.SOURCE_LOCAL if local else cls.SOURCE_HUB
        return {
            **{name: getattr(request, name) for name in _SAME_NAMES},
            "model_source": source,
            "builtin_model": request.model if builtin else BUILTIN_MODEL,
            "hub_id": request.model if source == cls.SOURCE_HUB else "",
            "local_path": request.model if local else "",
            "revision": request.revision,
            "preset": request.preset or CUSTOM_RECIPE,
            "recipe_yaml": request.recipe_yaml,
            "calibration_dataset": request.calibration_file.pk if request.calibration_file else None,
            "calibration_hub_dataset": request.calibration_hub_dataset,
            "evaluate_offline": bool(evaluation.get("offline")),
            "evaluation_tasks": ", ".join(evaluation.get("tasks") or []),
            "evaluation_limit": evaluation.get("limit"),
            "evaluation_backend": evaluation.get("backend", "hf"),
            "floor_percent": 100 * floor["at_least"] if floor else None,
            "floor_metric": floor.get("metric", "perplexity_recovery") if floor else "perplexity_recovery",
            "sweep_presets": search.get("presets") or [],
            "search_max_trials": budget.get("max_trials", 6),
            "search_max_seconds": budget.get("max_seconds"),
        }

    # --- errors the service raised ---------------------------------------------------------------------------

    def field_for_engine(self, engine_field: str | None) -> str | None:
        """The form field an EngineError's field concerns (None: the whole form)."""
        source = self.cleaned_data.get("model_source") if hasattr(self, "cleaned_data") else None
        kind = self.cleaned_data.get("calibration_kind") if hasattr(self, "cleaned_data") else None
        mapping = {
            "model": {self.SOURCE_HUB: "hub_id", self.SOURCE_LOCAL: "local_path"}.get(source, "builtin_model"),
            "revision": "revision",
            "preset": "preset",
            "recipe_yaml": "recipe_yaml",
            "calibration": {
                Job.CalibrationKind.UPLOAD: "calibration_upload",
                Job.CalibrationKind.HUB: "calibration_hub_dataset",
            }.get(kind, "calibration_kind"),
            "file": "calibration_upload",
            "evaluation": "evaluation_tasks",
            "device_class": "device_class",
            "gpus": "gpus",
            "priority": "priority",
            "search": "floor_percent",
        }
        name = mapping.get(request_field(engine_field) or "")
        return name if name in self.fields else None

    def apply_aria(self) -> None:
        apply_aria(self)


def apply_aria(form: forms.Form) -> None:
    """Tie each input to its help text and error message for screen readers (call before rendering)."""
    for name, field in form.fields.items():
        described = []
        if form.is_bound and name in form.errors:
            described.append(f"{name}-error")
            field.widget.attrs["aria-invalid"] = "true"
        if field.help_text:
            described.append(f"{name}-help")
        if described:
            field.widget.attrs["aria-describedby"] = " ".join(described)


class HubTokenForm(forms.Form):
    """A hub token to store (encrypted); the input never shows it back."""

    token = forms.CharField(
        label="Hub token",
        max_length=500,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off", "spellcheck": "false"}),
        help_text="A token with write access, from the hub's settings (Access Tokens). Stored encrypted; "
        "shown again only as its last four characters.",
    )


class HubPushForm(forms.Form):
    """Where to push a succeeded job's checkpoint and card."""

    repo_id = forms.CharField(
        label="Repository",
        max_length=200,
        help_text="namespace/name, e.g. your-name/my-model-FP8; made when missing, a new commit when it exists.",
    )
    private = forms.BooleanField(label="Private (for a new repository)", required=False, initial=True)


class SignInForm(AuthenticationForm):
    """Django's sign-in form that says why it refuses while failed sign-ins are over the limit (jobs.auth)."""

    def clean(self) -> dict[str, Any]:
        wait = login_wait_s(self.request, self.data.get("username"))
        if wait:
            raise forms.ValidationError(
                f"Too many failed sign-ins for this account or from this address; try again in {-(-wait // 60)} min.",
                code="rate_limited",
            )
        return super().clean()
