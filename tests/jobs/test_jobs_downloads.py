"""Downloads on a small checkpoint written by the test: streamed archives, Range requests, the manifest."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from django.conf import settings

pytestmark = pytest.mark.django_db


def _body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


@pytest.fixture
def done_job(user, make_job, checkpoint):
    job = make_job(user)
    files = {"model.safetensors": bytes(range(256)) * 4000, "config.json": b"{}", "sub/tokenizer.json": b"[1,2]"}
    checkpoint(job, files)
    return job, files


def test_archives_stream_every_file_with_its_sha256(api, done_job):
    job, files = done_job
    zipped = api.get(f"/api/v1/jobs/{job.pk}/archive/")
    tarred = api.get(f"/api/v1/jobs/{job.pk}/archive/", {"kind": "tar"})

    assert zipped.streaming and tarred.streaming  # produced while sent, never built whole first
    assert f'filename="job-{job.pk}-smollm2-135m-instruct-fp8-dynamic.zip"' in zipped["Content-Disposition"]
    zip_data = _body(zipped)
    assert int(zipped["Content-Length"]) == len(zip_data)  # known ahead: no chunked framing, a progress bar
    with zipfile.ZipFile(io.BytesIO(zip_data)) as archive:
        assert archive.testzip() is None
        got = {name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()}
    data = _body(tarred)
    assert int(tarred["Content-Length"]) == len(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        got_tar = {m.name.split("/", 1)[1]: archive.extractfile(m).read() for m in archive.getmembers()}
    for name, content in files.items():
        assert hashlib.sha256(got[name]).digest() == hashlib.sha256(content).digest()
        assert got_tar[name] == content
    assert "manifest.json" in got and "manifest.json" in got_tar


@pytest.mark.parametrize(
    ("header", "status", "span"),
    [
        ("bytes=0-99", 206, (0, 100)),
        ("bytes=1000-", 206, (1000, None)),
        ("bytes=-10", 206, (-10, None)),
        ("bytes=5-999999999", 206, (5, None)),
        ("bytes=99999999-", 416, None),
        ("bytes=0-1,5-6", 200, (0, None)),  # several ranges: the whole file
    ],
)
def test_single_file_download_honours_range(api, done_job, header, status, span):
    job, files = done_job
    content = files["model.safetensors"]

    response = api.get(f"/api/v1/jobs/{job.pk}/files/model.safetensors", HTTP_RANGE=header)

    assert response.status_code == status
    assert response["Accept-Ranges"] == "bytes"
    if status == 416:
        assert response["Content-Range"] == f"bytes */{len(content)}"
    else:
        start, end = span
        assert _body(response) == content[start:end]


def test_if_range_with_an_old_etag_gets_the_whole_file(api, done_job):
    job, files = done_job
    response = api.get(
        f"/api/v1/jobs/{job.pk}/files/model.safetensors", HTTP_RANGE="bytes=0-9", HTTP_IF_RANGE='"stale"'
    )
    assert response.status_code == 200 and _body(response) == files["model.safetensors"]
    etag = response["ETag"]
    again = api.get(f"/api/v1/jobs/{job.pk}/files/model.safetensors", HTTP_RANGE="bytes=0-9", HTTP_IF_RANGE=etag)
    assert again.status_code == 206 and _body(again) == files["model.safetensors"][:10]
    assert again["Content-Range"] == f"bytes 0-9/{len(files['model.safetensors'])}"


def test_only_manifest_files_are_served(api, done_job, media_root):
    # Given a checkpoint and, beside it on the server, a file that is none of its files
    job, files = done_job
    (media_root / "secret.txt").write_text("the server's secret")

    # When a file of the manifest is asked for, it comes whole, named, with its sha256 as its ETag
    got = api.get(f"/api/v1/jobs/{job.pk}/files/sub/tokenizer.json")
    body = _body(got)
    assert got.status_code == 200 and body == files["sub/tokenizer.json"]
    assert got["ETag"] == f'"{hashlib.sha256(body).hexdigest()}"'
    assert got["Content-Length"] == str(len(body)) and got["Content-Type"] == "application/json"
    assert got["Content-Disposition"] == 'attachment; filename="tokenizer.json"'

    # Then a path out of the checkpoint, or one the manifest does not list, is not found and sends nothing of it
    for path in ("../../secret.txt", "nothing.bin"):
        refused = api.get(f"/api/v1/jobs/{job.pk}/files/{path}")
        assert refused.status_code == 404 and b"secret" not in _body(refused)


def test_downloads_exist_only_for_succeeded_jobs(api, user, make_job):
    job = make_job(user, status="running")
    for path in ("archive/", "manifest/"):
        refused = api.get(f"/api/v1/jobs/{job.pk}/{path}")
        assert refused.status_code == 409 and not refused.streaming
        assert "has no checkpoint to download (it is running)" in refused.json()["detail"], refused.json()


def test_session_authenticated_browsers_download_too(client, user, done_job):
    job, files = done_job
    client.force_login(user)
    response = client.get(f"/api/v1/jobs/{job.pk}/files/config.json", HTTP_ACCEPT="text/html")
    assert response.status_code == 200 and _body(response) == files["config.json"]


@pytest.mark.parametrize(
    ("limit", "count_limit"),
    [(zipfile.ZIP64_LIMIT, zipfile.ZIP_FILECOUNT_LIMIT), (1500, zipfile.ZIP_FILECOUNT_LIMIT), (600, 3)],
    ids=["small-archive", "zip64-sizes-and-offsets", "zip64-end-records"],
)
def test_a_zips_length_is_known_before_it_is_written(monkeypatch, limit, count_limit):
    from jobs.downloads import _zip_stream, zip_length

    # Given files of several sizes (one with a non-ASCII name), and zipfile's ZIP64 limits lowered so that small
    # files take the paths of checkpoints over 2 GiB: ZIP64 sizes, offsets, end records
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", limit)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", count_limit)
    files = {"config.json": b"{}", "model-00001.safetensors": b"w" * 2000, "tokénizer.json": b"t" * 700}
    files.update({f"shard-{i}.bin": bytes([i]) * (100 * i) for i in range(1, 5)})
    entries = [(path, len(data)) for path, data in files.items()]

    # When the archive is written
    written = b"".join(_zip_stream(lambda path: iter([files[path]]), entries, "job-1", (2026, 12, 1, 0, 0, 0)))

    # Then its length is the one computed ahead, and it reads back whole
    assert zip_length(entries, "job-1") == len(written)
    with zipfile.ZipFile(io.BytesIO(written)) as archive:
        assert archive.testzip() is None
        assert {name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()} == files


# Another web process, as gunicorn runs several: it checks the job's files before sending them, and says which
# files it had to hash and whether it refused one.
_OTHER_PROCESS = """
import json, sys
from pathlib import Path

import django

django.setup()
from engine import artifacts
from jobs import downloads
from jobs.models import Job

hashed, real = [], artifacts.sha256_file
artifacts.sha256_file = lambda path: hashed.append(Path(path).name) or real(path)
job = Job(pk=int(sys.argv[1]), manifest=json.loads(sys.argv[2]))
try:
    downloads.ensure_intact(job, Path(sys.argv[3]), [entry["path"] for entry in job.manifest["files"]])
    refused = None
except downloads.DamagedCheckpoint as exc:
    refused = str(exc)
print(json.dumps({"hashed": hashed, "refused": refused}))
"""


def test_files_one_web_process_hashed_are_sent_by_another_without_hashing_them_again(api, done_job):
    # Given a checkpoint this process has sent whole (hashing each file against the manifest first)
    job, files = done_job
    assert api.get(f"/api/v1/jobs/{job.pk}/archive/").status_code == 200
    folder = Path(settings.MEDIA_ROOT) / job.artifacts_path

    def other_process() -> dict:
        argv = [sys.executable, "-c", _OTHER_PROCESS, str(job.pk), json.dumps(job.manifest), str(folder)]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout.splitlines()[-1])

    # Then another web process sends them as they are, without reading a 16 GB checkpoint first
    assert other_process() == {"hashed": [], "refused": None}
    # ...and once a file changes on disk, it hashes that one again and refuses it
    (folder / "model.safetensors").write_bytes(b"x" * len(files["model.safetensors"]))
    again = other_process()
    assert again["hashed"] == ["model.safetensors"] and "model.safetensors" in again["refused"], again


def test_without_the_shared_cache_files_are_still_hashed_before_they_are_sent(done_job, settings):
    # Given the shared cache unreachable: nothing listens on its port
    from jobs import downloads

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings.CACHES = {"default": {**settings.CACHES["default"], "LOCATION": f"redis://127.0.0.1:{port}/0"}}
    job, files = done_job
    folder = Path(settings.MEDIA_ROOT) / job.artifacts_path
    paths = [entry["path"] for entry in job.manifest["files"]]

    # Then intact files pass, and a changed one is refused all the same
    downloads.ensure_intact(job, folder, paths)
    (folder / "config.json").write_bytes(b"[]")
    with pytest.raises(downloads.DamagedCheckpoint, match="config.json"):
        downloads.ensure_intact(job, folder, paths)
