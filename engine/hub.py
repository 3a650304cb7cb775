"""The Hugging Face hub through huggingface_hub's HTTP API: a model's metadata, and a pinned download.

Submission reads only metadata (the file list with sizes and the commit sha, config.json, the safetensors
header), which costs a few small requests whatever the model's size; the worker then downloads exactly that
commit, reporting bytes. HF_ENDPOINT names another server that speaks the hub's API (the tests run one); it
is read at each call, not when huggingface_hub is first imported.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from engine.errors import EngineError
from engine.spec import BUILTIN_MODEL

DEFAULT_ENDPOINT = "https://huggingface.co"
_METADATA_TIMEOUT_S = 10.0
# What a model folder needs; pickle weights only when the operator allows them.
_MODEL_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py")
_PICKLE_PATTERNS = ("*.bin",)

# bytes done, bytes in all, the file being fetched
DownloadProgress = Callable[[int, int, str], None]


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1"


@dataclass(frozen=True)
class HubModel:
    """What the hub says about one commit of a model repository, without its weights."""

    commit: str
    files: dict[str, int]  # path in the repository -> size in bytes
    config: dict
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # safetensors header: name -> (dtype, shape); {} if none


def model_metadata(repo_id: str, revision: str | None, *, allow_local: bool = True) -> HubModel:
    """The model's file list, config.json and safetensors header at `revision`, pinned to its commit sha.
    allow_local: whether a refusal may suggest a local model folder instead (not where they are disabled)."""
    from huggingface_hub import HfApi

    _refuse_offline(repo_id, allow_local=allow_local)
    try:
        info = HfApi(endpoint=endpoint()).model_info(
            repo_id, revision=revision, files_metadata=True, timeout=_METADATA_TIMEOUT_S
        )
        files = {sibling.rfilename: int(sibling.size or 0) for sibling in info.siblings or []}
        if "config.json" not in files:
            raise EngineError(f"'{repo_id}' is not a Hugging Face model: it has no config.json.", field="model")
        config, tensors = _commit_contents(endpoint(), repo_id, info.sha)
    except _failures() as exc:
        raise hub_error(exc, repo_id, revision, allow_local=allow_local) from None
    return HubModel(commit=info.sha, files=files, config=config, tensors=tensors)


@functools.lru_cache(maxsize=256)
def _commit_contents(hub_endpoint: str, repo_id: str, commit: str) -> tuple[dict, dict]:
    """config.json and the safetensors header of one commit: a commit never changes, so they are kept, and
    the next submission of the same model costs one request (the revision's commit) instead of four."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import NotASafetensorsRepoError

    config_path = hf_hub_download(repo_id, "config.json", revision=commit, endpoint=hub_endpoint)
    try:
        header = HfApi(endpoint=hub_endpoint).get_safetensors_metadata(
            repo_id, revision=commit, timeout=_METADATA_TIMEOUT_S
        )
    except NotASafetensorsRepoError:
        return _json(Path(config_path)), {}  # pickle weights only: judged by the file list, shapes by the worker
    tensors = {
        name: (tensor.dtype, tuple(tensor.shape))
        for file in header.files_metadata.values()
        for name, tensor in file.tensors.items()
    }
    return _json(Path(config_path)), tensors


def download(
    repo_id: str,
    commit: str,
    *,
    allow_pickle: bool,
    progress: DownloadProgress | None = None,
    into: Path | None = None,
    make_room: Callable[[int], None] | None = None,
) -> Path:
    """Download the model files of one commit into the hub cache; return the snapshot folder.

    Files come one after another, each through hf_hub_download (resumable, verified, cached), so that the
    progress is one count of bytes over the whole model. `into` names a folder of its own instead of the hub
    cache (the node's model cache, engine.model_cache), and make_room hears the bytes to come before the first.
    """
    from huggingface_hub import HfApi, hf_hub_download

    patterns = _MODEL_PATTERNS + (_PICKLE_PATTERNS if allow_pickle else ())
    try:
        if offline():
            if into is not None:  # nothing of the hub cache to fall back on there
                raise _unreachable(repo_id)
            return Path(_cached_snapshot(repo_id, commit, patterns))  # a copy already in the hub cache still works
        info = HfApi(endpoint=endpoint()).model_info(repo_id, revision=commit, files_metadata=True)
        wanted = {
            s.rfilename: int(s.size or 0) for s in info.siblings or [] if any(fnmatch(s.rfilename, p) for p in patterns)
        }
        if make_room:
            make_room(sum(wanted.values()))
        counter = _ByteCounter(sum(wanted.values()), progress)
        folder = None
        for name in sorted(wanted):
            counter.file = name
            bar = counter.bar_class()
            path = hf_hub_download(repo_id, name, revision=commit, endpoint=endpoint(), local_dir=into, tqdm_class=bar)
            folder = Path(path).parent if "/" not in name else folder
            counter.file_done(wanted[name])
    except _failures() as exc:
        raise hub_error(exc, repo_id, commit) from None
    return folder or Path(_cached_snapshot(repo_id, commit, patterns))


def _cached_snapshot(repo_id: str, commit: str, patterns: tuple[str, ...]) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, revision=commit, allow_patterns=list(patterns), local_files_only=True)


class _ByteCounter:
    """Adds up the bytes huggingface_hub's progress bars see, across the files of one model."""

    def __init__(self, total: int, progress: DownloadProgress | None) -> None:
        self.total, self.progress = total, progress
        self.before = 0  # bytes of the files already fetched
        self.current = 0  # bytes of the file being fetched
        self.file = ""

    def bar_class(self) -> type:
        from huggingface_hub.utils import tqdm

        counter = self

        class Bar(tqdm):
            def update(self, n: float | None = 1) -> bool | None:
                counter.add(int(n or 0))  # negative when a resumed download starts over
                return super().update(n)

        return Bar

    def add(self, n: int) -> None:
        self.current += n
        self._report()

    def file_done(self, size: int) -> None:
        self.before, self.current = self.before + size, 0  # a cached file reports nothing: count it here
        self._report()

    def _report(self) -> None:
        if self.progress:
            self.progress(min(self.before + self.current, self.total), self.total, self.file)


def check_dataset(dataset_id: str) -> None:
    """A hub calibration dataset exists and can be read (its metadata only: the worker loads the rows)."""
    from huggingface_hub import HfApi

    if offline():
        raise _unreachable(dataset_id, field="calibration")
    try:
        HfApi(endpoint=endpoint()).dataset_info(dataset_id, timeout=_METADATA_TIMEOUT_S)
    except _failures() as exc:
        raise hub_error(exc, dataset_id, None, field="calibration") from None


def _failures() -> tuple[type[Exception], ...]:
    """What talking to the hub raises: its HTTP answers, a network that fails, offline mode, an empty cache.

    Nothing broader: a cancel, Celery's soft time limit or a full disk must reach the task as they are.
    """
    import httpx
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        SafetensorsParsingError,
    )

    return (HfHubHTTPError, httpx.HTTPError, OfflineModeIsEnabled, LocalEntryNotFoundError, SafetensorsParsingError)


def hub_error(
    exc: Exception, repo_id: str, revision: str | None, *, field: str = "model", allow_local: bool = True
) -> EngineError:
    """A hub failure in words that say what to do, on the field the user can change (a model or a dataset)."""
    import httpx
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    noun = "model" if field == "model" else "dataset"
    if isinstance(exc, GatedRepoError):
        return EngineError(
            f"'{repo_id}' is a gated {noun} on the hub: its owners must grant access first. Accept its terms on "
            "the hub with your account, and give this service a token (HF_TOKEN) of an account that has access.",
            field=field,
        )
    if isinstance(exc, RevisionNotFoundError):
        return EngineError(f"The {noun} '{repo_id}' has no revision '{revision}' on the hub.", field="revision")
    if isinstance(exc, RepositoryNotFoundError):
        return EngineError(
            f"The {noun} '{repo_id}' was not found on the hub (check the name; a private {noun} needs a token "
            "with access).",
            field=field,
        )
    if isinstance(exc, (OfflineModeIsEnabled, LocalEntryNotFoundError, httpx.TransportError)):
        return _unreachable(repo_id, field=field, allow_local=allow_local)
    return EngineError(f"The hub could not give the {noun} '{repo_id}': {exc}", field=field)


def _refuse_offline(repo_id: str, *, allow_local: bool = True) -> None:
    if offline():
        raise _unreachable(repo_id, allow_local=allow_local)


def _unreachable(repo_id: str, *, field: str = "model", allow_local: bool = True) -> EngineError:
    if field != "model":
        instead = "Upload a JSONL file or use the built-in calibration set."
    elif allow_local:
        instead = f"Use a local model folder or the built-in model '{BUILTIN_MODEL}'."
    else:  # never advise what the same server refuses ("Local model folders are disabled on this server")
        instead = f"Use the built-in model '{BUILTIN_MODEL}'."
    return EngineError(
        f"The Hugging Face hub cannot be reached from this machine, so '{repo_id}' cannot be used. {instead}",
        field=field,
    )


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(f"The model's config.json is not valid JSON: {exc}", field="model") from None
