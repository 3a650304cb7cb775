"""Part s3_downloads: checkpoint downloads through an S3-compatible bucket vs the local-disk download.

The same 1 GB fake checkpoint as part_downloads (4 x 256 MiB + config.json + manifest.json) is uploaded, as a
worker uploads it (jobs.artifact_store.publish: sha256 metadata, manifest last), to a moto S3 server that runs
as its own process on this machine. A second web server with COMPRESSOR_STORAGE=s3 serves it. Cases, A B pairs
(A: local disk through the bench's web server, B: the bucket), read by part_downloads' client loop:
- one 256 MiB file: local FileResponse vs the 302 to a presigned URL followed by the GET from the bucket;
- the whole checkpoint as a zip: local files vs objects streamed from the bucket through the web server.
The ratio is bucket throughput / local throughput (medians). moto is a Python server: a real object store
(MinIO, S3) serves faster, so these are a floor for the service's own overhead, not the bucket's speed.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from django.test import override_settings

from bench.common import PYTHON, Figure, bench_env, median
from bench.part_downloads import checkpoint_dir, ensure_checkpoint, http_request, read_all, register_job
from bench.stack import Process, Stack, free_port
from tests.support import wait_until


def _upload(job, manifest: dict, scratch: Path, s3) -> float:
    """Upload the fake checkpoint as a worker would (hard links into the scratch folder, which publish removes)."""
    from jobs import artifact_store

    with override_settings(**s3.django_settings(scratch)):
        folder = artifact_store.work_folder(job)
        folder.mkdir(parents=True)
        for entry in [*manifest["files"], {"path": "manifest.json"}]:
            os.link(checkpoint_dir() / entry["path"], folder / entry["path"])
        started = time.perf_counter()
        artifact_store.publish(job, folder, manifest)
        return time.perf_counter() - started


def _get(port: int, path: str, token: str) -> dict:
    """One GET through part_downloads' client loop; a refusal is an error, not a figure."""
    result = read_all(port, http_request(path, port, token), http=True)
    if result["status"] != 200:
        raise RuntimeError(f"GET {path} answered {result['status']}")
    return result


def _presigned_get(web_port: int, path: str, token: str) -> dict:
    """The service's 302, then the bucket's GET of the presigned URL: one timing for both."""
    started = time.perf_counter()
    redirect = read_all(web_port, http_request(path, web_port, token), http=True)
    if redirect["status"] != 302:
        raise RuntimeError(f"the bucket's file download answered {redirect['status']}, not 302")
    url = urlsplit(redirect["headers"]["location"])
    request = f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\nConnection: close\r\n\r\n".encode()
    got = read_all(url.port, request, http=True)
    if got["status"] != 200:
        raise RuntimeError(f"the presigned GET answered {got['status']}")
    return {"seconds": time.perf_counter() - started, "bytes": got["bytes"]}


def run(stack: Stack, *, pairs: int = 3) -> list[Figure]:
    from jobs.models import Job
    from tests.s3_server import CREDENTIALS, S3Server

    manifest = ensure_checkpoint()
    local_job = register_job(stack.user, manifest)
    s3 = S3Server(bucket=f"bench-{uuid.uuid4().hex[:8]}")
    scratch = Path(tempfile.mkdtemp(prefix="s3-scratch-", dir=checkpoint_dir().parent))
    os.environ.update(CREDENTIALS)  # this process uploads; the keys never go into settings
    moto = Process("moto", s3.command(str(PYTHON)), {})
    web = None
    try:
        from botocore.exceptions import EndpointConnectionError

        # moto refuses connections until it listens
        created = lambda: s3.create_bucket() or True  # noqa: E731
        wait_until(created, timeout=60, what="the moto S3 server", not_yet=(EndpointConnectionError,))
        s3_job = register_job(stack.user, manifest)
        Job.objects.filter(pk=s3_job.pk).update(artifacts_path=s3_job.artifacts_relpath())
        upload_s = _upload(s3_job, manifest, scratch, s3)
        total = sum(entry["size"] for entry in manifest["files"])
        port = free_port()
        argv = [str(PYTHON), "manage.py", "runserver", "--noreload", "--insecure", f"127.0.0.1:{port}"]
        web = Process("web-s3", argv, {**bench_env(), **s3.env(scratch)})
        presets = lambda: _get(port, "/api/v1/presets/", stack.token)  # noqa: E731
        wait_until(presets, timeout=90, what="the web server on the bucket", not_yet=(OSError,))
        shard = next(entry for entry in manifest["files"] if entry["path"].endswith(".safetensors"))
        shard_path, archive_path = f"files/{shard['path']}", "archive/"
        cases = {
            "single 256 MiB file (presigned GET)": (
                lambda: _get(stack.port, f"/api/v1/jobs/{local_job.pk}/{shard_path}", stack.token),
                lambda: _presigned_get(port, f"/api/v1/jobs/{s3_job.pk}/{shard_path}", stack.token),
                shard["size"],
            ),
            "1 GB checkpoint archive (zip, streamed)": (
                lambda: _get(stack.port, f"/api/v1/jobs/{local_job.pk}/{archive_path}", stack.token),
                lambda: _get(port, f"/api/v1/jobs/{s3_job.pk}/{archive_path}", stack.token),
                total,
            ),
        }
        figures = [
            Figure(
                "s3_downloads",
                "S3: upload of the 1 GB checkpoint (managed transfer, multipart)",
                "info",
                f"{total / upload_s / 1e6:.0f} MB/s ({upload_s:.1f} s)",
            )
        ]
        for label, (local, bucket, expected) in cases.items():
            local_times, bucket_times = [], []
            for _ in range(pairs):
                for measure, times in ((local, local_times), (bucket, bucket_times)):
                    result = measure()
                    if result["bytes"] < expected:
                        raise RuntimeError(f"{label}: {result['bytes']} bytes, expected at least {expected}")
                    times.append(result["seconds"])
            local_rate, bucket_rate = expected / median(local_times), expected / median(bucket_times)
            ratio = bucket_rate / local_rate
            notes = [
                f"local disk: {', '.join(f'{t:.2f}' for t in local_times)} s; "
                f"bucket: {', '.join(f'{t:.2f}' for t in bucket_times)} s (A B pairs)"
            ]
            figures.append(
                Figure(
                    "s3_downloads",
                    f"S3 download: {label} vs local disk",
                    "info: bucket / local",
                    f"{bucket_rate / 1e6:.0f} MB/s vs {local_rate / 1e6:.0f} MB/s",
                    ratio,
                    "info",
                    notes,
                )
            )
        return figures
    finally:
        if web is not None:
            web.stop()
        moto.stop()
