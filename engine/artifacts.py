"""Checkpoint files: a sha256 manifest of every file, and publication by atomic rename.

The weights are hashed as they are written (hashed_weights): transformers' save_pretrained writes each
safetensors shard through write_safetensors, which feeds the same bytes to the file and to sha256, so the
manifest never reads the shards back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
_CHUNK = 1024 * 1024
_STAGING_MARK = ".partial-"  # temporary folders are named .<final name>.partial-<random>
# Room a checkpoint needs beyond the compressed weights (tokenizer, card, results), and the share of the
# original weights' size a compressed copy may take at most (bf16 -> 8 bit is about half).
_SPACE_MARGIN_BYTES = 64 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, *, hashed: dict[str, tuple[int, str]] | None = None, **extra: object) -> dict:
    """Hash every file below folder (except the manifest itself) into manifest.json.

    hashed: {relative path: (size, sha256)} of files hashed as they were written (hashed_weights); such a file
    is not read again unless its size changed since."""
    hashed = hashed or {}

    def entry(path: Path) -> dict:
        name, size = str(path.relative_to(folder)), path.stat().st_size
        known_size, known = hashed.get(name, (None, None))
        return {"path": name, "size": size, "sha256": known if known_size == size else sha256_file(path)}

    files = [entry(path) for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)]
    manifest = {"files": files, "total_bytes": sum(f["size"] for f in files), **extra}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return manifest


# safetensors' names of torch's dtypes (its format's "dtype" field).
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "uint16": "U16", "uint32": "U32", "uint64": "U64", "complex64": "C64",
}  # fmt: skip
_WRITE_CHUNK = 8 * 1024 * 1024


def write_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> str:
    """Write tensors as a safetensors file (its format: an 8-byte little-endian header length, the JSON header,
    then each tensor's bytes at its data_offsets) and return the file's sha256, computed from the bytes as they
    are written: a thread hashes each chunk while this one writes it (both release the GIL).

    Tensors must be on the CPU (transformers' save_pretrained gathers each shard there first)."""
    import torch

    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    ordered = sorted(tensors.items(), key=lambda item: (-item[1].element_size(), item[0]))  # widest dtypes first
    offset = 0
    for name, tensor in ordered:
        size = tensor.numel() * tensor.element_size()
        dtype = _SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")]
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()

    def chunks() -> Iterator[memoryview]:
        yield memoryview(struct.pack("<Q", len(encoded)) + encoded)
        for _name, tensor in ordered:
            raw = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            for start in range(0, len(raw), _WRITE_CHUNK):
                yield raw[start : start + _WRITE_CHUNK]

    with path.open("wb") as handle, ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:
        for chunk in chunks():
            hashed = hasher.submit(digest.update, chunk)
            handle.write(chunk)
            hashed.result()
    return digest.hexdigest()


@contextmanager
def hashed_weights(folder: Path) -> Iterator[dict[str, tuple[int, str]]]:
    """While the block runs, the safetensors shards transformers' save_pretrained writes go through
    write_safetensors; yields {path relative to folder: (size, sha256)} for write_manifest(hashed=...).

    save_pretrained's shard writer is replaced for the block (engine.library_patches.safetensors_writer)."""
    from engine.library_patches import safetensors_writer

    hashes: dict[str, tuple[int, str]] = {}

    def save(tensors: dict[str, Any], filename: str, metadata: dict[str, str] | None = None) -> None:
        path = Path(filename)
        digest = write_safetensors(tensors, path, metadata)
        hashes[str(path.resolve().relative_to(Path(folder).resolve()))] = (path.stat().st_size, digest)

    with safetensors_writer(save):
        yield hashes


def verify_manifest(folder: Path) -> list[str]:
    """Paths whose size or sha256 differ from the manifest (empty when the checkpoint is intact)."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    return [
        entry["path"]
        for entry in manifest["files"]
        if not (folder / entry["path"]).is_file() or sha256_file(folder / entry["path"]) != entry["sha256"]
    ]


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@contextmanager
def staging_folder(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling of out_dir; renamed into place only if the block completes.

    Readers never see a half-written checkpoint: out_dir appears whole or not at all.
    """
    if out_dir.exists():
        raise FileExistsError(f"The output folder '{out_dir}' already exists; choose a new one.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{_STAGING_MARK}", dir=out_dir.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the published checkpoint is readable like any folder
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def staging_folders(parents: Iterable[Path]) -> list[Path]:
    """The temporary folders staging_folder left in these folders (a run killed before it published)."""
    return [
        path
        for parent in parents
        if parent.is_dir()
        for path in parent.iterdir()
        if path.name.startswith(".") and _STAGING_MARK in path.name and path.is_dir()
    ]


def checkpoint_space_bytes(weights_bytes: int) -> int:
    """Disk a checkpoint may take: the compressed weights up to the original bfloat16 size (data-free or
    partly ignored schemes), plus the tokenizer and the reports."""
    return weights_bytes + _SPACE_MARGIN_BYTES


def write_if_changed(path: Path, text: str) -> None:
    """Replace the file in one step, and only when its text changes: another worker may be reading it."""
    if path.is_file() and path.read_text() == text:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


# A model's processor files beside its tokenizer's, by transformers' names (transformers.utils: IMAGE_PROCESSOR_NAME,
# PROCESSOR_NAME, VIDEO_PROCESSOR_NAME, CHAT_TEMPLATE_FILE, LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE): a vision-language
# model's image and video preprocessing, without which vLLM cannot build its processor.
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


def copy_processor_files(model_dir: Path, checkpoint: Path) -> list[str]:
    """Copy the model's processor files the checkpoint does not have yet (the tokenizer's own save writes its chat
    template); returns their names."""
    copied = [name for name in PROCESSOR_FILES if (model_dir / name).is_file() and not (checkpoint / name).exists()]
    for name in copied:
        shutil.copyfile(model_dir / name, checkpoint / name)
    return copied
