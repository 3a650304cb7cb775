"""Checkpoint files: a sha256 manifest of every file, and publication by atomic rename."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

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


def write_manifest(folder: Path, **extra: object) -> dict:
    """Hash every file below folder (except the manifest itself) into manifest.json."""
    files = [
        {"path": str(path.relative_to(folder)), "size": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    ]
    manifest = {"files": files, "total_bytes": sum(f["size"] for f in files), **extra}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return manifest


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
