"""A job request's fields, in one place: what a user asks for, and how it maps onto the Job record, the API's
shape and the engine's spec. The serializer, the form, the admin and the services all go through JobInput.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from django.conf import settings

from engine.limits import CALIBRATION_COLUMN, CALIBRATION_MAX_SEQ_LEN, CALIBRATION_SAMPLES, CALIBRATION_SPLIT
from engine.spec import BUILTIN_MODEL, CalibrationSpec, CompressionSpec, EvaluationSpec, SearchSpec
from jobs.artifact_store import local_copy
from jobs.models import CalibrationDataset, Job

# Job model field for each input field whose name differs (the others have the same name on both).
_JOB_FIELD = {"model": "model_source", "revision": "model_revision"}

# The engine names the part of a request a problem concerns (EngineError.field); where the request calls it
# differently. The API answers under the request's name; the form maps the request's names onto its inputs.
_REQUEST_FIELD = {"recipe": "recipe_yaml", "device": "device_class"}


def request_field(engine_field: str | None) -> str | None:
    """The request field an engine error concerns, by the API's name; None for the request as a whole."""
    return _REQUEST_FIELD.get(engine_field, engine_field) if engine_field else None


# The API nests the calibration fields: {"calibration": {"kind": ..., "dataset_id": ..., "samples": ...}}.
API_CALIBRATION_FIELDS = {
    "calibration_kind": "kind",
    "calibration_hub_dataset": "hub_dataset",
    "calibration_split": "split",
    "calibration_column": "column",
    "calibration_samples": "samples",
    "calibration_max_seq_len": "max_seq_len",
}


@dataclass(frozen=True)
class JobInput:
    """What a user asks for; built by the API serializer, the form and the admin alike."""

    model: str = BUILTIN_MODEL
    revision: str = ""
    preset: str = ""
    recipe_yaml: str = ""
    calibration_kind: str = Job.CalibrationKind.BUILTIN.value
    calibration_file: CalibrationDataset | None = None
    calibration_hub_dataset: str = ""
    calibration_split: str = CALIBRATION_SPLIT
    calibration_column: str = CALIBRATION_COLUMN
    calibration_samples: int = CALIBRATION_SAMPLES.default
    calibration_max_seq_len: int = CALIBRATION_MAX_SEQ_LEN.default
    evaluation: dict[str, Any] | None = None
    ignore_indivisible: bool = False
    priority: int = Job.PRIORITY_NORMAL
    device_class: str = ""
    gpus: int | None = None  # None: as many as the memory plan needs
    # A floor search or a sweep (engine.spec.SearchSpec's shape: floor, budget, presets); None: one compression.
    search: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # One shape for the evaluation, whoever built the request: every EvaluationSpec field, defaults filled
        # in (so the same request from the form and from the API has the same fingerprint).
        if self.evaluation is not None:
            spec = EvaluationSpec(**{**self.evaluation, "tasks": tuple(self.evaluation.get("tasks") or ())})
            object.__setattr__(self, "evaluation", {**asdict(spec), "tasks": list(spec.tasks)})
        if self.search is not None:  # likewise: every field, defaults filled in
            search = SearchSpec.from_dict(self.search)
            object.__setattr__(self, "search", {**asdict(search), "presets": list(search.presets)})

    @classmethod
    def from_job(cls, job: Job) -> JobInput:
        """The request that produced a job (for retry, clone and edit, and the engine's spec)."""
        return cls(**{f.name: getattr(job, _JOB_FIELD.get(f.name, f.name)) for f in fields(cls)})

    def job_fields(self) -> dict[str, Any]:
        """The Job record's fields for this request, normalised (trimmed names, the default device class)."""
        values = {_JOB_FIELD.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}
        values.update(
            model_source=self.model.strip(),
            model_revision=self.revision.strip(),
            calibration_file=self.calibration_file if self.calibration_kind == Job.CalibrationKind.UPLOAD else None,
            device_class=self.device_class or settings.COMPRESSOR_DEFAULT_DEVICE_CLASS,
        )
        return values

    @classmethod
    def from_api(cls, data: dict[str, Any], *, calibration_file: CalibrationDataset | None) -> JobInput:
        """From a validated API request (its calibration fields nested under "calibration")."""
        calibration = data["calibration"]
        flat = {name: calibration[api_name] for name, api_name in API_CALIBRATION_FIELDS.items()}
        shared = {f.name: data[f.name] for f in fields(cls) if f.name in data and f.name != "calibration_file"}
        evaluation = data.get("evaluation")
        shared["evaluation"] = dict(evaluation) if evaluation is not None else None
        shared["device_class"] = data.get("device_class", "")
        return cls(**shared, **flat, calibration_file=calibration_file)

    def to_spec(self, *, device: str = "auto", fetch_upload: bool = True) -> CompressionSpec:
        """The engine's view of this request (plain data, no Django).

        fetch_upload False (the web process's submission check): an upload whose rows were counted as it came
        in is not copied out of a bucket; the check reads the count, and the worker fetches the file."""
        common = {"samples": self.calibration_samples, "max_seq_len": self.calibration_max_seq_len}
        if self.calibration_kind == Job.CalibrationKind.UPLOAD:
            upload = self.calibration_file
            fetch = upload is not None and (fetch_upload or upload.rows is None)
            path = str(_calibration_path(upload)) if fetch else None
            calibration = CalibrationSpec(kind="jsonl", path=path, rows=upload.rows if upload else None, **common)
        else:
            calibration = CalibrationSpec(
                kind=self.calibration_kind,
                dataset=self.calibration_hub_dataset or None,
                split=self.calibration_split,
                column=self.calibration_column,
                **common,
            )
        evaluation = None
        if self.evaluation is not None:
            evaluation = EvaluationSpec(**{**self.evaluation, "tasks": tuple(self.evaluation["tasks"])})
        return CompressionSpec(
            model=self.model,
            revision=self.revision or None,
            preset=self.preset or None,
            recipe_yaml=self.recipe_yaml or None,
            calibration=calibration,
            evaluation=evaluation,
            device=device,
            gpus=self.gpus,
            ignore_indivisible=self.ignore_indivisible,
            allow_pickle=settings.COMPRESSOR_ALLOW_PICKLE,
            trust_remote_code=settings.COMPRESSOR_ALLOW_REMOTE_CODE,
            allow_local_paths=settings.COMPRESSOR_ALLOW_LOCAL_PATHS,
            search=SearchSpec.from_dict(self.search) if self.search is not None else None,
        )


def engine_device(device_class: str) -> str:
    """The engine's device for a job's device class: a CPU job on the CPU, a GPU job on whatever it finds."""
    return "cpu" if device_class == Job.DeviceClass.CPU else "auto"


def job_spec(job: Job, *, fetch_upload: bool = True) -> CompressionSpec:
    """The engine's view of a job (plain data, no Django), on its device class's device: once submitted, with
    the recorded recipe and the pinned commit, so the worker runs what the submission check saw."""
    spec = JobInput.from_job(job).to_spec(device=engine_device(job.device_class), fetch_upload=fetch_upload)
    return dataclasses.replace(
        spec, revision=job.model_commit or spec.revision, resolved_recipe=job.resolved_recipe or None
    )


def _calibration_path(dataset: CalibrationDataset) -> Path:
    return local_copy(dataset.file.name, sha256=dataset.sha256)


def api_calibration(job: Job) -> dict[str, Any]:
    """A job's calibration fields in the API's nested shape (no query: the file by its id)."""
    return {"dataset_id": job.calibration_file_id} | {
        api_name: getattr(job, name) for name, api_name in API_CALIBRATION_FIELDS.items()
    }
