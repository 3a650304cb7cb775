"""One cache of hub models per node, shared by its workers: each revision downloaded once, kept under a size
limit by evicting the least recently used models that no running job uses.

An entry is one repository at one pinned commit (a commit never changes, so an entry never goes stale).
Under the cache folder:

    <owner>--<name>--<commit>/   a complete model folder, the entry: only a finished download is renamed here
    .partial/<key>/              a download under way, or one a dead worker left (the next download resumes it)
    .trash/                      entries being deleted (renamed here first, so a half-deleted one is never used)
    .locks/<key>.download        held exclusively by the one job that downloads that revision
    .locks/<key>.lease           held shared by each job that uses the entry; eviction needs it exclusively

The locks are flock(2) locks on open files: the kernel drops them when their process ends, however it ends
(SIGKILL, the OOM killer), so a dead job neither pins an entry nor blocks a download. flock coordinates the
processes of one machine: the cache belongs on a node's own disk. Lock files are never deleted: removing one
that another process has opened but not yet locked would let two processes each hold "the" lock.

The limit counts entries and unfinished downloads. A model larger than the limit on its own is still used
(a job must run): its download evicts every entry no job uses, and it leaves the cache when its last job
ends, so an idle cache is always under its limit; only entries in use can keep it above.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from engine.errors import CancelledError
from engine.units import size_text

# fetch(into=folder, make_room=callback): download the model into folder (resuming what is there), calling
# make_room(bytes) with the download's size before its first byte (engine.hub.download takes exactly these).
Fetch = Callable[..., object]

_COMMIT = re.compile(r"[0-9a-f]{40}")
_KEY = re.compile(r"[\w.\-]+--[0-9a-f]{40}")  # an entry's folder name (anything else there is left alone)
_REPO_ID = re.compile(r"(?!.*--)(?!.*\.\.)[\w.\-]+(/[\w.\-]+)?")
_WAIT_POLL_S = 0.5


@dataclass(frozen=True)
class CacheEntry:
    """A complete model in the cache."""

    key: str
    path: Path
    size_bytes: int
    last_used: float  # the folder's mtime, set each time a job starts or stops using it

    @property
    def name(self) -> str:
        *repo, commit = self.key.split("--")
        return model_name("/".join(repo), commit)


def model_name(repo_id: str, commit: str) -> str:
    """How the log names a revision: owner/name@abcdef123456."""
    return f"{repo_id}@{commit[:12]}"


def entry_key(repo_id: str, commit: str) -> str:
    """The entry's folder name; only a pinned commit is cached (a branch moves, a commit never does)."""
    if not _COMMIT.fullmatch(commit):
        raise ValueError(f"The model cache keeps pinned commits only, not '{commit[:60]}'.")
    if not _REPO_ID.fullmatch(repo_id):
        raise ValueError(f"'{repo_id[:100]}' is not a hub repository id.")
    return f"{repo_id.replace('/', '--')}--{commit}"


class ModelCache:
    """The node's cache as one job sees it: entries it holds stay leased until the cache is closed.

    limit_mb is decimal MB (engine.units); 0 means no limit. log receives the lines for the job's log;
    should_cancel is asked while the job waits for another job's download.
    """

    def __init__(
        self,
        root: Path,
        *,
        limit_mb: int,
        log: Callable[[str], None] = lambda line: None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> None:
        self.root = Path(root)
        self.limit_bytes = limit_mb * 10**6
        self.log = log
        self.should_cancel = should_cancel
        self._held = ExitStack()

    def __enter__(self) -> ModelCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._held.close()

    def hold(self, repo_id: str, commit: str, fetch: Fetch) -> Path:
        """The entry's folder, downloaded if needed, leased until this cache is closed (the job's whole run)."""
        return self._held.enter_context(self.entry(repo_id, commit, fetch))

    @contextmanager
    def entry(self, repo_id: str, commit: str, fetch: Fetch) -> Iterator[Path]:
        """The entry's folder, leased while the block runs; downloaded once, whoever asks at the same time."""
        key = entry_key(repo_id, commit)
        folder = self.root / key
        for part in (".locks", ".partial", ".trash"):
            (self.root / part).mkdir(parents=True, exist_ok=True)
        with _lock_file(self._lock_path(key, "lease")) as lease:
            fcntl.flock(lease, fcntl.LOCK_SH)  # waits only while an eviction removes this entry
            if folder.is_dir():
                self.log(f"Using the cached model {model_name(repo_id, commit)} ({size_text(_folder_bytes(folder))})")
            else:
                self._download(key, model_name(repo_id, commit), fetch)
            _touch(folder)
            try:
                yield folder
            finally:
                _touch(folder)
        self.evict()  # a model larger than the limit leaves once no job uses it

    def entries(self) -> list[CacheEntry]:
        """The complete models in the cache (never a download under way), least recently used first."""
        found = []
        for path in self.root.iterdir() if self.root.is_dir() else ():
            if not _KEY.fullmatch(path.name) or not path.is_dir():
                continue
            try:
                found.append(CacheEntry(path.name, path, _folder_bytes(path), path.stat().st_mtime))
            except FileNotFoundError:  # evicted by another worker meanwhile
                continue
        return sorted(found, key=lambda entry: entry.last_used)

    def evict(self, room_bytes: int = 0) -> None:
        """Delete what no job uses, abandoned downloads first, then the least recently used entries, until the
        cache and room_bytes fit under the limit."""
        if not self.limit_bytes:
            return
        _empty(self.root / ".trash")  # what a worker that died while deleting left
        entries = self.entries()
        partials = _subfolders(self.root / ".partial")  # disk in use too (a resumed one is counted twice: erring safe)
        excess = sum(e.size_bytes for e in entries) + sum(map(_folder_bytes, partials)) + room_bytes - self.limit_bytes
        for partial in partials:
            if excess > 0 and (freed := self._remove_abandoned(partial)):
                excess -= freed
                self.log(f"Removed an unfinished download ({size_text(freed)}) to stay under the cache limit")
        for entry in entries:
            if excess > 0 and self._remove_unused(entry):
                excess -= entry.size_bytes
                self.log(f"Evicted {entry.name} (LRU, {size_text(entry.size_bytes)}) to stay under the cache limit")

    def _download(self, key: str, name: str, fetch: Fetch) -> None:
        with self._download_lock(key, name):
            folder = self.root / key
            if folder.is_dir():
                self.log(f"Using the cached model {name}, which another job downloaded meanwhile")
                return
            self.log(f"Downloading {name} into this node's model cache")
            partial = self.root / ".partial" / key
            fetch(into=partial, make_room=self._make_room)
            shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's notes for resuming
            os.replace(partial, folder)
        self.evict()

    def _make_room(self, incoming_bytes: int) -> None:
        if self.limit_bytes and incoming_bytes > self.limit_bytes:
            self.log(
                f"The model ({size_text(incoming_bytes)}) is larger than the cache limit "
                f"({size_text(self.limit_bytes)}): it is used all the same, and leaves the cache once no job uses it"
            )
        self.evict(room_bytes=incoming_bytes)

    @contextmanager
    def _download_lock(self, key: str, name: str) -> Iterator[None]:
        with _lock_file(self._lock_path(key, "download")) as lock:
            if not _try_lock(lock, fcntl.LOCK_EX):
                self.log(f"Waiting for another job's download of {name}")
                while not _try_lock(lock, fcntl.LOCK_EX):  # polled, so that a cancel is noticed
                    if self.should_cancel and self.should_cancel():
                        raise CancelledError("The job was cancelled.")
                    time.sleep(_WAIT_POLL_S)
            yield

    def _remove_unused(self, entry: CacheEntry) -> bool:
        with _lock_file(self._lock_path(entry.key, "lease")) as lease:
            if not _try_lock(lease, fcntl.LOCK_EX):
                return False  # a job uses it
            trash = self.root / ".trash" / f"{entry.key}-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(entry.path, trash)
            except FileNotFoundError:
                return False  # another worker evicted it first
            except OSError as exc:  # housekeeping: a job that ran must not fail for it
                self.log(f"Could not evict {entry.name}: {exc}")
                return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _remove_abandoned(self, partial: Path) -> int:
        """Delete a download nobody is doing (its worker died or gave up); return the bytes freed."""
        with _lock_file(self._lock_path(partial.name, "download")) as lock:
            if not _try_lock(lock, fcntl.LOCK_EX):
                return 0  # under way
            freed = _folder_bytes(partial)
            shutil.rmtree(partial, ignore_errors=True)
            return freed

    def _lock_path(self, key: str, kind: str) -> Path:
        return self.root / ".locks" / f"{key}.{kind}"


@contextmanager
def _lock_file(path: Path) -> Iterator[int]:
    """An open lock file; closing it releases any lock taken on it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)


def _try_lock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _touch(folder: Path) -> None:
    now = time.time_ns()  # given, not UTIME_NOW: the kernel's own clock ticks too coarsely to order two uses
    try:
        os.utime(folder, ns=(now, now))
    except FileNotFoundError:  # a failed download left no entry
        pass


def _folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:
            continue
    return total


def _subfolders(folder: Path) -> list[Path]:
    return [path for path in folder.iterdir() if path.is_dir()] if folder.is_dir() else []


def _empty(folder: Path) -> None:
    for path in _subfolders(folder):
        shutil.rmtree(path, ignore_errors=True)
