"""Part 5, downloads: a 1 GB checkpoint through the real download endpoints vs sendfile on a raw socket.

A fake checkpoint (4 x 256 MiB of random bytes + config.json + manifest.json written by
engine.artifacts.write_manifest) lives under var/bench/data/media/bench/; a succeeded Job pointing at it is
registered through the ORM, so /api/v1/jobs/<id>/archive/ and /files/<path> serve it as they would any job.

Both sides are read by the same client loop (recv_into a 1 MiB buffer over a fresh loopback connection), so
the ratio compares the servers: the service's HTTP stack against the kernel copying the same bytes.
Pairs run A B A B; the figure is the ratio of the medians.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

from bench.common import DATA_DIR, PYTHON, REPO, Figure, median, verdict
from bench.stack import Stack

CHECKPOINT_REL = "bench/checkpoint-1g"
SHARD_BYTES = 256 * 2**20
SHARDS = 4
BUF = 1 << 20
PAIRS = 3


def checkpoint_dir() -> Path:
    return DATA_DIR / "media" / CHECKPOINT_REL


def ensure_checkpoint() -> dict:
    """The 1 GiB fake checkpoint with its manifest (reused between runs when intact in size)."""
    from engine.artifacts import MANIFEST_NAME, write_manifest

    folder = checkpoint_dir()
    names = [f"model-{i:05d}-of-{SHARDS:05d}.safetensors" for i in range(1, SHARDS + 1)]
    manifest_path = folder / MANIFEST_NAME
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        sizes = {f["path"]: f["size"] for f in manifest.get("files", [])}
        if all(sizes.get(n) == SHARD_BYTES and (folder / n).stat().st_size == SHARD_BYTES for n in names):
            return manifest
    folder.mkdir(parents=True, exist_ok=True)
    block = 64 * 2**20
    for name in names:
        with (folder / name).open("wb") as handle:
            for _ in range(SHARD_BYTES // block):
                handle.write(os.urandom(block))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "note": "fake bench checkpoint"}))
    return write_manifest(folder, model="bench-fake-1g", preset="fp8-dynamic")


def register_job(owner, manifest: dict):
    """A succeeded job whose checkpoint is the fake one (an operator-style setup step, through the ORM)."""
    from django.utils import timezone

    from jobs.models import Job

    now = timezone.now()
    return Job.objects.create(
        owner=owner,
        preset="fp8-dynamic",
        status=Job.Status.SUCCEEDED,
        stage=Job.Stage.DONE,
        message="bench: fake 1 GB checkpoint",
        percent=100.0,
        started_at=now,
        finished_at=now,
        artifacts_path=CHECKPOINT_REL,
        manifest=manifest,
        results={"output_dir": CHECKPOINT_REL, "timings": {}},
    )


# --- the one client loop both sides use ---------------------------------------------------------------------


def read_all(port: int, request: bytes, *, http: bool, timeout: float = 120.0) -> dict:
    """Connect, send the request, read to EOF into one reused buffer; bytes, seconds, headers, tail."""
    buf = bytearray(BUF)
    view = memoryview(buf)
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    total = 0
    head = b""
    tail = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        while True:
            n = sock.recv_into(view)
            if n == 0:
                break
            total += n
            if http and len(head) < 65536 and b"\r\n\r\n" not in head:
                head += bytes(view[:n])
            tail = (tail + bytes(view[max(0, n - 64) : n]))[-64:]
            if time.monotonic() > deadline:
                raise TimeoutError("download took too long")
    elapsed = time.perf_counter() - started
    result = {"seconds": elapsed, "bytes": total, "tail": tail, "status": None, "headers": {}}
    if http:
        header_block, _, _ = head.partition(b"\r\n\r\n")
        lines = header_block.decode("latin-1").split("\r\n")
        result["status"] = int(lines[0].split()[1])
        pairs = (ln.split(":", 1) for ln in lines[1:] if ":" in ln)
        result["headers"] = {k.strip().lower(): v.strip() for k, v in pairs}
        result["bytes"] = total - len(header_block) - 4
    return result


def http_request(path: str, port: int, token: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Token {token}\r\n"
        "Accept-Encoding: identity\r\nConnection: close\r\n\r\n"
    ).encode()


# --- Range: resume an interrupted download ---------------------------------------------------------------


def check_range_resume(stack: Stack, job_id: int, entry: dict) -> tuple[bool, str]:
    """Stop a download part-way, resume it with Range + If-Range, and check the joined bytes' sha256."""
    url = f"{stack.base}/api/v1/jobs/{job_id}/files/{entry['path']}"
    session = stack.api.new_session()
    size = entry["size"]
    cut = size // 3 + 12345  # an odd place, not on a chunk boundary
    digest = hashlib.sha256()
    got = 0
    with session.get(url, stream=True, timeout=60) as first:
        if first.status_code != 200:
            return False, f"first GET answered {first.status_code}"
        etag = first.headers.get("ETag")
        for chunk in first.iter_content(BUF):
            take = chunk[: cut - got]
            digest.update(take)
            got += len(take)
            if got >= cut:
                break  # the connection "drops" here
    problems = []
    with session.get(url, headers={"Range": f"bytes={got}-", "If-Range": etag or ""}, stream=True, timeout=60) as rest:
        if rest.status_code != 206:
            problems.append(f"resume answered {rest.status_code}, not 206")
        expected_range = f"bytes {got}-{size - 1}/{size}"
        if rest.headers.get("Content-Range") != expected_range:
            problems.append(f"Content-Range {rest.headers.get('Content-Range')!r} != {expected_range!r}")
        for chunk in rest.iter_content(BUF):
            digest.update(chunk)
            got += len(chunk)
    if got != size:
        problems.append(f"{got} bytes in all, expected {size}")
    if digest.hexdigest() != entry["sha256"]:
        problems.append("sha256 of the resumed file differs from the manifest")
    local = checkpoint_dir() / entry["path"]
    with local.open("rb") as handle:
        handle.seek(size - 1000)
        last = handle.read()
    suffix = session.get(url, headers={"Range": "bytes=-1000"}, timeout=60)
    if suffix.status_code != 206 or suffix.content != last:
        problems.append(f"suffix range bytes=-1000 answered {suffix.status_code} with wrong bytes")
    beyond = session.get(url, headers={"Range": f"bytes={size}-"}, timeout=60)
    if beyond.status_code != 416:
        problems.append(f"a range past the end answered {beyond.status_code}, not 416")
    stale = session.get(url, headers={"Range": "bytes=0-9", "If-Range": '"not-the-etag"'}, stream=True, timeout=60)
    if stale.status_code != 200:
        problems.append(f"If-Range with a stale ETag answered {stale.status_code}, not 200 (whole file)")
    stale.close()
    if problems:
        return False, "; ".join(problems)
    return True, f"cut at byte {cut:,}, resumed with Range + If-Range: sha256 matches; suffix range and 416 correct"


# --- the part ------------------------------------------------------------------------------------------


def run(stack: Stack, *, pairs: int = PAIRS) -> list[Figure]:
    manifest = ensure_checkpoint()
    job = register_job(stack.user, manifest)
    folder = checkpoint_dir()
    files = [folder / f["path"] for f in manifest["files"]] + [folder / "manifest.json"]
    archive_bytes = sum(p.stat().st_size for p in files)
    shard_index = next(i for i, f in enumerate(manifest["files"]) if f["path"].endswith(".safetensors"))
    shard = manifest["files"][shard_index]

    baseline = subprocess.Popen(
        [str(PYTHON), str(REPO / "bench" / "sendfile_server.py"), *map(str, files)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        base_port = int(baseline.stdout.readline().strip())
        for path in files:  # both sides read from the page cache
            with path.open("rb") as handle:
                while handle.read(16 * BUF):
                    pass

        cases = {
            "archive": (
                f"/api/v1/jobs/{job.pk}/archive/",
                b"all\n",
                archive_bytes,
            ),
            "file": (
                f"/api/v1/jobs/{job.pk}/files/{shard['path']}",
                f"one {shard_index}\n".encode(),
                shard["size"],
            ),
        }
        figures = []
        for case, (path, base_request, expected) in cases.items():
            svc_times, base_times, notes = [], [], []
            http_req = http_request(path, stack.port, stack.token)
            for _ in range(pairs):
                # A: the service
                res = read_all(stack.port, http_req, http=True)
                if res["status"] != 200:
                    raise RuntimeError(f"{case} download answered {res['status']}")
                if case == "file" and res["bytes"] != expected:
                    raise RuntimeError(f"file download: {res['bytes']} bytes, expected {expected}")
                if case == "archive":
                    if res["bytes"] < expected:
                        raise RuntimeError(f"archive: {res['bytes']} bytes, less than the {expected} of the files")
                    if b"PK\x05\x06" not in res["tail"]:
                        raise RuntimeError("archive: no zip end-of-central-directory record at the end")
                svc_times.append(res["seconds"])
                svc_bytes = res["bytes"]
                # B: the baseline
                res = read_all(base_port, base_request, http=False)
                if res["bytes"] != expected:
                    raise RuntimeError(f"baseline sent {res['bytes']} bytes, expected {expected}")
                base_times.append(res["seconds"])
            svc_rate = svc_bytes / median(svc_times)
            base_rate = expected / median(base_times)
            ratio = svc_rate / base_rate
            notes.append(
                f"service {case}: {', '.join(f'{t:.2f}' for t in svc_times)} s; "
                f"sendfile: {', '.join(f'{t:.2f}' for t in base_times)} s (A B pairs)"
            )
            if case == "file":
                # Diagnostic: the same bytes as one 206 "bytes=0-" answer (streamed in 1 MiB chunks).
                ranged = http_request(path, stack.port, stack.token).replace(
                    b"Connection: close", b"Range: bytes=0-\r\nConnection: close"
                )
                res = read_all(stack.port, ranged, http=True)
                notes.append(
                    f"same file as Range bytes=0- (206, 1 MiB chunks): {res['bytes'] / res['seconds'] / 1e6:.0f} MB/s "
                    "- a plain 200 goes through FileResponse, which the server reads in blocks of "
                    "FileResponse.block_size (4 KiB)"
                )
            label = "1 GB checkpoint archive (zip)" if case == "archive" else "single 256 MiB file"
            figures.append(
                Figure(
                    "downloads",
                    f"Download: {label} vs sendfile",
                    ">= 50 % of socket speed",
                    f"{svc_rate / 1e6:.0f} MB/s vs {base_rate / 1e6:.0f} MB/s",
                    ratio,
                    verdict(ratio >= 0.5),
                    notes,
                )
            )
        ok, detail = check_range_resume(stack, job.pk, shard)
        figures.append(Figure("downloads", "Download: Range resume", "bytes identical", detail, None, verdict(ok)))
        return figures
    finally:
        baseline.stdin.close()
        try:
            baseline.wait(5)
        except subprocess.TimeoutExpired:
            baseline.kill()
