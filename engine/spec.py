"""What a compression job asks for, as plain data shared by the CLI, the workers and the service."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from engine.limits import (
    CALIBRATION_COLUMN,
    CALIBRATION_MAX_SEQ_LEN,
    CALIBRATION_SAMPLES,
    CALIBRATION_SPLIT,
    SEARCH_MAX_TRIALS,
)

BUILTIN_MODEL = "smollm2-135m-instruct"
BUILTIN_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the built-in model's original on the hub
BUILTIN_CALIBRATION = "builtin"


class Stage(StrEnum):
    """The stages of a job in the order they happen, each with its label: the one declaration of them (Job.Stage,
    the progress weights of engine.stages, the pages' timeline and every stage name in the code derive from it).

    "waiting" is the queue's, before any run. "preparing" downloads a hub model and the calibration data and runs
    the checks that need the weights (engine.preflight); "calibrating" runs llm-compressor with calibration data,
    which calibrates and compresses each layer (one pass per calibrating modifier), so its label says both;
    "compressing" runs a data-free recipe; "checking" loads the checkpoint in vLLM where the worker has it;
    "hashing" writes the card and the sha256 manifest."""

    label: str

    def __new__(cls, value: str, label: str) -> Stage:
        member = str.__new__(cls, value)
        member._value_ = value
        member.label = label
        return member

    WAITING = "waiting", "Waiting in the queue"
    PREPARING = "preparing", "Preparing"
    LOADING = "loading", "Loading"
    CALIBRATING = "calibrating", "Calibrating and compressing"
    COMPRESSING = "compressing", "Compressing"
    SAVING = "saving", "Saving"
    CHECKING = "checking", "Checking in vLLM"
    EVALUATING = "evaluating", "Evaluating"
    HASHING = "hashing", "Writing the card and hashing the files"
    DONE = "done", "Done"


# The stages a run reports (ProgressEvent.stage), in order: all but the queue's.
STAGES = tuple(stage for stage in Stage if stage is not Stage.WAITING)


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration text comes from.

    kind: "builtin" (text the project generates), "jsonl" (a local file of {"text"} or {"messages"} rows),
    "hub" (a Hugging Face dataset id + split + column), or "none" (data-free presets only).
    rows: a jsonl file's usable rows when they were counted already (an upload); None: counted by reading it.
    """

    kind: str = BUILTIN_CALIBRATION
    path: str | None = None
    dataset: str | None = None
    split: str = CALIBRATION_SPLIT
    column: str = CALIBRATION_COLUMN
    samples: int = CALIBRATION_SAMPLES.default
    max_seq_len: int = CALIBRATION_MAX_SEQ_LEN.default
    rows: int | None = None


@dataclass(frozen=True)
class EvaluationSpec:
    """Which evaluation to run after compression: the offline suite and/or lm-eval tasks."""

    offline: bool = True
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    heldout_path: str | None = None
    backend: str = "hf"

    def __post_init__(self) -> None:
        # A task named twice would be run and reported twice: each is kept once, where it first appears.
        object.__setattr__(self, "tasks", tuple(dict.fromkeys(self.tasks)))


@dataclass(frozen=True)
class QualityFloor:
    """The least quality a checkpoint must keep: metric (engine.submission.FLOOR_METRICS) at least `at_least`,
    a fraction of the baseline's (0.99: 99 % recovery)."""

    metric: str = "perplexity_recovery"
    at_least: float = 0.99


@dataclass(frozen=True)
class SearchBudget:
    """How much a search may spend: trials (each a compression and a held-out measurement) and/or seconds;
    max_size_ratio: the largest checkpoint worth trying, as a fraction of the original's size."""

    max_trials: int = SEARCH_MAX_TRIALS.default
    max_seconds: float | None = None
    max_size_ratio: float | None = None


@dataclass(frozen=True)
class SearchSpec:
    """A floor search or a sweep (engine.search): the presets to try (a sweep: several), the floor the chosen
    checkpoint must meet (None: the sweep only measures), and the budget."""

    floor: QualityFloor | None = None
    budget: SearchBudget = field(default_factory=SearchBudget)
    presets: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSpec:
        floor = data.get("floor")
        return cls(
            floor=QualityFloor(**floor) if floor else None,
            budget=SearchBudget(**(data.get("budget") or {})),
            presets=tuple(data.get("presets") or ()),
        )


@dataclass(frozen=True)
class CompressionSpec:
    """One job: model + (preset or custom recipe) + calibration (+ evaluation)."""

    model: str = BUILTIN_MODEL
    revision: str | None = None
    preset: str | None = None
    recipe_yaml: str | None = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec | None = None
    device: str = "auto"
    # The GPUs the job asks for (evaluation and the vLLM check use them with tensor parallelism); None: as many
    # as the memory plan needs.
    gpus: int | None = None
    ignore_indivisible: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    # False on the web service: the model is the built-in name or a hub id, never a folder on the server.
    allow_local_paths: bool = True
    # The recipe recorded at submission (preset or custom, with any layers left unquantized): the worker runs
    # it as is. None: not checked yet (the engine's own CLI), so preflight runs the submission check first.
    resolved_recipe: str | None = None
    # A floor search or a sweep instead of one compression (engine.search); None: the plain run.
    search: SearchSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionSpec:
        data = dict(data)
        data["calibration"] = CalibrationSpec(**(data.get("calibration") or {}))
        evaluation = data.get("evaluation")
        if evaluation is not None:
            evaluation = dict(evaluation)
            evaluation["tasks"] = tuple(evaluation.get("tasks") or ())
            data["evaluation"] = EvaluationSpec(**evaluation)
        if data.get("search") is not None:
            data["search"] = SearchSpec.from_dict(data["search"])
        return cls(**data)


@dataclass
class ProgressEvent:
    """One progress report: the stage, optionally step i of n, and/or a log line.

    stage is one of STAGES. fraction is the whole job's progress (0 to 1) as the runner weighs its
    stages; None on log lines and on events from outside the runner.
    """

    stage: str
    step: int | None = None
    total: int | None = None
    message: str = ""
    log_line: str | None = None
    metrics: dict[str, Any] | None = None
    fraction: float | None = None


@dataclass
class CompressionResult:
    """What a finished run produced: the checkpoint folder, its sizes, timings and per-layer errors."""

    output_dir: Path
    size_before_bytes: int
    size_after_bytes: int
    timings: dict[str, float]
    layer_errors: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # the device that ran it and its memory plan

    @property
    def compression_ratio(self) -> float:
        return self.size_before_bytes / self.size_after_bytes if self.size_after_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "size_before_bytes": self.size_before_bytes,
            "size_after_bytes": self.size_after_bytes,
            "compression_ratio": round(self.compression_ratio, 3),
            "timings": self.timings,
            "layer_errors": self.layer_errors,
            "evaluation": self.evaluation,
            "settings": self.settings,
        }
