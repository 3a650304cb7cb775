"""The node's model cache (engine.model_cache) with real processes holding its locks: eviction by least recent
use under a small limit, never of an entry a live process uses; a killed holder's lease is gone with it; a
download that did not finish is never an entry; two processes asking at once download once.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from engine.errors import CancelledError
from engine.model_cache import ModelCache, entry_key
from tests.support import REPO, wait_until

MB = 10**6

# A process of its own that asks the cache for a revision and holds it until its stdin closes. Its download
# counts itself in a file and writes half of `size` bytes; then it hangs there ("hang", to be killed), waits
# for a file named "go" ("gate"), or goes on ("hold") to write the whole.
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from engine.model_cache import ModelCache

    root, repo_id, commit, size, mode = sys.argv[1:6]

    def fetch(into, make_room):
        with open(Path(root) / "downloads.count", "a") as count:
            count.write("1")
        into.mkdir(parents=True, exist_ok=True)
        (into / "model.safetensors").write_bytes(bytes(int(size) // 2))
        print("downloading", flush=True)
        while mode == "hang" or (mode == "gate" and not (Path(root) / "go").exists()):
            time.sleep(0.05)
        (into / "model.safetensors").write_bytes(bytes(int(size)))

    cache = ModelCache(Path(root), limit_mb=0, log=lambda line: print(line, flush=True))
    with cache.entry(repo_id, commit, fetch) as folder:
        print("holding", folder, flush=True)
        sys.stdin.read()
    """
)


def commit_of(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def key_of(repo_id: str) -> str:
    return entry_key(repo_id, commit_of(repo_id))


def writer(size: int, calls: list[str] | None = None):
    """A fetch that writes a model of `size` bytes, after asking for room as engine.hub.download does."""

    def fetch(into: Path, make_room) -> None:
        make_room(size)
        into.mkdir(parents=True, exist_ok=True)
        (into / "model.safetensors").write_bytes(bytes(size))
        if calls is not None:
            calls.append(into.name)

    return fetch


def refuse(into: Path, make_room) -> None:
    raise AssertionError("the model was downloaded again")


def add(cache: ModelCache, repo_id: str, size: int = MB) -> Path:
    with cache.entry(repo_id, commit_of(repo_id), writer(size)) as folder:
        return folder


class Holder:
    """A live process holding one entry; release() ends it, kill() SIGKILLs it. Its output goes to a file."""

    def __init__(self, root: Path, repo_id: str, size: int = MB, mode: str = "hold") -> None:
        args = [root, repo_id, commit_of(repo_id), str(size), mode]
        self.output = root.parent / f"holder-{uuid.uuid4().hex[:8]}.out"
        with self.output.open("w") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-c", HOLDER, *map(str, args)],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdin=subprocess.PIPE,
                stdout=output,
                text=True,
            )

    @property
    def lines(self) -> list[str]:
        return self.output.read_text().splitlines()

    def wait_for(self, start: str) -> str:
        """Until it printed a line beginning with `start`; fails if it exited first."""

        def printed() -> str | None:
            found = next((line for line in self.lines if line.startswith(start)), None)
            assert found or self.process.poll() is None, f"the holder exited: {self.lines}"
            return found

        return wait_until(printed, timeout=60, interval=0.05, what=f"the holder to print '{start}'")

    def release(self) -> None:
        self.process.stdin.close()
        assert self.process.wait(timeout=30) == 0

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture
def holders():
    started: list[Holder] = []

    def start(*args, **kwargs) -> Holder:
        started.append(Holder(*args, **kwargs))
        return started[-1]

    yield start
    for holder in started:
        if holder.process.poll() is None:
            holder.kill()


def test_eviction_under_a_small_limit_never_touches_an_entry_another_process_uses(tmp_path, holders):
    # Given three 1 MB models in a 3 MB cache, the oldest held by a job in another process
    log: list[str] = []
    cache = ModelCache(tmp_path, limit_mb=3, log=log.append)
    for name in ("org/held", "org/second", "org/third"):
        add(cache, name)
    holder = holders(tmp_path, "org/held")
    holder.wait_for("holding")
    os.utime(tmp_path / key_of("org/held"), ns=(1, 1))  # and the least recently used

    # When two more models come
    add(cache, "org/fourth")
    add(cache, "org/fifth")

    # Then the held one stays, and the others went in the order of their last use
    names = [entry.name.split("@")[0] for entry in cache.entries()]
    assert sorted(names) == ["org/fifth", "org/fourth", "org/held"]
    evictions = [line for line in log if line.startswith("Evicted")]
    assert evictions == [
        f"Evicted org/second@{commit_of('org/second')[:12]} (LRU, 1.0 MB) to stay under the cache limit",
        f"Evicted org/third@{commit_of('org/third')[:12]} (LRU, 1.0 MB) to stay under the cache limit",
    ]
    assert "Using the cached model org/held" in holder.lines[0]
    holder.release()


def test_the_least_recently_used_entry_goes_first_and_a_use_makes_an_entry_recent(tmp_path):
    # Given three models in a 3 MB cache, added a, b, c, then a used again
    log: list[str] = []
    cache = ModelCache(tmp_path, limit_mb=3, log=log.append)
    for name in ("org/a", "org/b", "org/c"):
        add(cache, name)
    with cache.entry("org/a", commit_of("org/a"), refuse):
        pass
    assert [entry.name[:5] for entry in cache.entries()] == ["org/b", "org/c", "org/a"]

    # When a fourth comes, then a fifth
    add(cache, "org/d")
    add(cache, "org/e")

    # Then b went first, then c: a was used after them
    assert [line.split()[1][:5] for line in log if line.startswith("Evicted")] == ["org/b", "org/c"]
    assert [entry.name[:5] for entry in cache.entries()] == ["org/a", "org/d", "org/e"]
    assert f"Using the cached model org/a@{commit_of('org/a')[:12]} (1.0 MB)" in log


def test_a_killed_holders_lease_is_released(tmp_path, holders):
    # Given a model held by a process that is then killed (SIGKILL: no chance to clean up)
    cache = ModelCache(tmp_path, limit_mb=1)
    add(cache, "org/held")
    holder = holders(tmp_path, "org/held")
    holder.wait_for("holding")
    add(cache, "org/other")
    assert [entry.name[:8] for entry in cache.entries()] == ["org/held"]  # the newer one went: the old one is in use
    holder.kill()

    # When the cache next makes room
    add(cache, "org/new")

    # Then the dead job's model was evicted like any other
    assert [entry.name[:7] for entry in cache.entries()] == ["org/new"]


def test_a_download_killed_half_way_is_not_an_entry_and_the_next_one_resumes_it(tmp_path, holders):
    # Given a process killed in the middle of its download
    cache = ModelCache(tmp_path, limit_mb=0)
    holder = holders(tmp_path, "org/partial", size=2 * MB, mode="hang")
    holder.wait_for("downloading")
    holder.kill()

    # Then nothing is in the cache, though half the file is on disk
    assert cache.entries() == []
    partial = tmp_path / ".partial" / key_of("org/partial")
    assert (partial / "model.safetensors").stat().st_size == MB

    # When another job asks for it, its download starts from what is there, and only then is it an entry
    seen: list[int] = []

    def resume(into: Path, make_room) -> None:
        seen.append((into / "model.safetensors").stat().st_size)
        assert cache.entries() == []
        (into / "model.safetensors").write_bytes(bytes(2 * MB))

    with cache.entry("org/partial", commit_of("org/partial"), resume) as folder:
        assert seen == [MB] and (folder / "model.safetensors").stat().st_size == 2 * MB
    assert [entry.size_bytes for entry in cache.entries()] == [2 * MB]
    assert not partial.exists()


def test_a_download_that_fails_leaves_no_entry(tmp_path):
    cache = ModelCache(tmp_path, limit_mb=0)

    def fail(into: Path, make_room) -> None:
        into.mkdir(parents=True)
        (into / "config.json").write_text("{}")
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"), cache.entry("org/m", commit_of("org/m"), fail):
        pass
    assert cache.entries() == []
    calls: list[str] = []
    with cache.entry("org/m", commit_of("org/m"), writer(10, calls)):
        assert calls == [key_of("org/m")]


def test_two_processes_asking_at_once_download_once(tmp_path, holders):
    # Given one process downloading a revision
    first = holders(tmp_path, "org/shared", mode="gate")
    first.wait_for("downloading")

    # When a second asks for the same revision meanwhile, and the download then ends
    second = holders(tmp_path, "org/shared")
    second.wait_for("Waiting for another job's download of org/shared@")
    (tmp_path / "go").touch()
    second.wait_for("holding")
    first.wait_for("holding")

    # Then it waited for the first one's download and used it: one download
    assert (tmp_path / "downloads.count").read_text() == "1"
    assert "which another job downloaded meanwhile" in second.lines[1]
    assert first.lines[0].startswith("Downloading org/shared@")
    first.release()
    second.release()


def test_a_job_waiting_for_another_jobs_download_stops_when_cancelled(tmp_path, holders):
    # Given a download under way in another process
    holder = holders(tmp_path, "org/slow", mode="hang")
    holder.wait_for("downloading")
    asked: list[bool] = []

    def should_cancel() -> bool:
        asked.append(True)
        return len(asked) > 2

    # When a job waiting for it is cancelled, it stops waiting
    cache = ModelCache(tmp_path, limit_mb=0, should_cancel=should_cancel)
    with pytest.raises(CancelledError), cache.entry("org/slow", commit_of("org/slow"), refuse):
        pass
    assert len(asked) == 3


def test_a_model_larger_than_the_limit_is_used_alone_and_leaves_when_its_job_ends(tmp_path):
    # Given a 2 MB cache holding two 1 MB models
    log: list[str] = []
    cache = ModelCache(tmp_path, limit_mb=2, log=log.append)
    add(cache, "org/a")
    add(cache, "org/b")

    # When a job uses a 3 MB model
    with cache.entry("org/big", commit_of("org/big"), writer(3 * MB)) as folder:
        # Then the others made room, and the big one is there while it is used
        assert [entry.path for entry in cache.entries()] == [folder]
        larger = "The model (3.0 MB) is larger than the cache limit (2.0 MB): it is used all the same"
        assert any(line.startswith(larger) for line in log), log

    # ...and leaves once its job ended: the idle cache is under its limit
    assert cache.entries() == []
    assert log[-1].startswith("Evicted org/big@") and "(LRU, 3.0 MB)" in log[-1]


def test_only_a_pinned_commit_is_cached(tmp_path):
    cache = ModelCache(tmp_path, limit_mb=0)
    with pytest.raises(ValueError, match="pinned commits only"), cache.entry("org/m", "main", refuse):
        pass
    with pytest.raises(ValueError, match="not a hub repository id"), cache.entry("../x", commit_of("x"), refuse):
        pass


def test_a_job_holds_its_entry_until_its_cache_is_closed(tmp_path):
    # Given a job's cache holding a model (as the worker's run does), in a 1 MB cache
    with ModelCache(tmp_path, limit_mb=1) as job_cache:
        held = job_cache.hold("org/held", commit_of("org/held"), writer(MB))

        # When another job adds a model meanwhile, the held one stays
        add(ModelCache(tmp_path, limit_mb=1), "org/other")
        assert held.is_dir()

    # Once the job's cache is closed, it is evictable
    add(ModelCache(tmp_path, limit_mb=1), "org/third")
    assert not held.exists()


def test_a_folder_that_is_not_an_entry_is_never_evicted(tmp_path):
    # Given a cache folder that also holds something else (the model store's built-in model, say)
    other = tmp_path / "smollm2-135m-instruct"
    other.mkdir()
    (other / "model.safetensors").write_bytes(bytes(2 * MB))
    cache = ModelCache(tmp_path, limit_mb=1)

    # When the cache makes room
    add(cache, "org/a")
    add(cache, "org/b")

    # Then it counted and removed only its own entries
    assert [entry.name[:5] for entry in cache.entries()] == ["org/b"]
    assert (other / "model.safetensors").stat().st_size == 2 * MB
