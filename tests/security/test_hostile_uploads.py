"""Hostile calibration uploads: malformed, wrongly encoded, empty, one enormous line, over the size limit, too
many rows, too costly to parse. Each is a 400 naming the file with the reason; nothing is stored; an oversized
body is not read to its end. An upload is parsed once, as it streams in: a job naming it never reads it again.
Owners delete their uploads, unless an active job uses them."""

from __future__ import annotations

import io
import json
import time

import pytest

from jobs.models import CalibrationDataset, Job

pytestmark = pytest.mark.django_db


def _upload(client, content: bytes):
    upload = io.BytesIO(content)
    upload.name = "cal.jsonl"
    return client.post("/api/v1/calibration-datasets/", {"file": upload}, format="multipart")


def _stored_files(media_root) -> list:
    return [p for p in (media_root / "calibration").rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"text": "one"}\n{"text": "two"}\n{"text": "three\n', "Line 3: not valid JSON"),
        (b'{"text": "one"}\n["a list"]\n', "Line 2: expected an object"),
        (b'{"text": "caf\xe9"}\n', "not UTF-8"),
        (b"", "empty"),
        (b"\n \n\n", "no rows"),
        (b'{"text": "' + b"a" * (100 * 2**20) + b'"}\n', "Line 1 is longer than 4 MiB"),
        (b'{"text": "fine"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n", "Line 2: not valid JSON"),
        (b'{"text": "fine"} {"text": "two on a line"}\n', "Line 1: not valid JSON (Extra data)"),
    ],
    ids=["malformed", "not-an-object", "latin-1", "empty", "blank-lines", "one-100-MB-line", "deep", "two-on-a-line"],
)
def test_a_bad_calibration_file_is_refused_with_the_reason(api, media_root, content, message):
    before = _stored_files(media_root)

    response = _upload(api, content)

    assert response.status_code == 400, response.content
    assert message in response.json()["file"][0], response.json()
    assert not CalibrationDataset.objects.exists() and _stored_files(media_root) == before


def test_a_file_over_the_size_limit_is_cut_off_while_it_streams_in(api, settings, media_root):
    # Within the room the Content-Length check leaves for form fields: the streaming count stops it
    settings.COMPRESSOR_MAX_UPLOAD_BYTES = 2**20
    before = _stored_files(media_root)

    response = _upload(api, b'{"text": "row"}\n' * (2**20 // 16 + 2000))

    assert response.status_code == 400 and "larger than the limit of 1 MiB" in response.json()["file"][0]
    assert not CalibrationDataset.objects.exists() and _stored_files(media_root) == before


class _CountingBody(io.RawIOBase):
    """A request body of `size` bytes that remembers how much of it the server read."""

    def __init__(self, size: int) -> None:
        self.size, self.read_bytes = size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.size - self.read_bytes)
        buffer[:count] = b"a" * count
        self.read_bytes += count
        return count


def test_a_body_declared_over_the_limit_is_refused_before_it_is_read(user, settings):
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections
    from rest_framework.authtoken.models import Token

    settings.COMPRESSOR_MAX_UPLOAD_BYTES = 2**20
    body = _CountingBody(50 * 2**20)
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/api/v1/calibration-datasets/",
        "CONTENT_TYPE": "multipart/form-data; boundary=xyz",
        "CONTENT_LENGTH": str(body.size),
        "HTTP_AUTHORIZATION": f"Token {Token.objects.create(user=user).key}",
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BufferedReader(body),
        "wsgi.errors": io.StringIO(),
    }
    answer = {}

    # As Django's test client does: the test's database connection stays open around the request.
    for signal in (request_started, request_finished):
        signal.disconnect(close_old_connections)
    try:
        content = b"".join(WSGIHandler()(environ, lambda status, headers: answer.update(status=status)))
    finally:
        for signal in (request_started, request_finished):
            signal.connect(close_old_connections)

    assert answer["status"].startswith("400") and b"larger than the limit of 1 MiB" in content, content
    assert body.read_bytes < 64 * 1024, f"read {body.read_bytes} bytes of a refused body"
    assert not CalibrationDataset.objects.exists()


def test_the_job_form_stops_an_oversized_upload_too(client, user, settings, media_root):
    settings.COMPRESSOR_MAX_UPLOAD_BYTES = 2**20
    client.force_login(user)
    before = _stored_files(media_root)
    upload = io.BytesIO(b'{"text": "row"}\n' * (2**20 // 8))
    upload.name = "big.jsonl"

    response = client.post("/jobs/new/", {"calibration_kind": "upload", "calibration_upload": upload})

    assert response.status_code == 400
    assert not CalibrationDataset.objects.exists() and _stored_files(media_root) == before


def test_a_file_with_a_utf8_byte_order_mark_is_accepted(api):
    response = _upload(api, b'\xef\xbb\xbf{"text": "one"}\r\n{"text": "two"}\r\n')

    assert response.status_code == 201, response.content
    assert response.json()["rows"] == 2


def test_an_upload_over_the_row_limit_is_refused_as_it_streams_in(api, settings, media_root):
    settings.COMPRESSOR_MAX_UPLOAD_ROWS = 1000
    before = _stored_files(media_root)

    within = _upload(api, b'{"text": "row"}\n' * 1000)
    over = _upload(api, b'{"text": "row"}\n' * 1001)

    assert within.status_code == 201 and within.json()["rows"] == 1000
    assert over.status_code == 400 and "more than 1,000 rows" in over.json()["file"][0], over.content
    assert CalibrationDataset.objects.count() == 1 and len(_stored_files(media_root)) == len(before) + 1


def test_parsing_an_upload_stops_past_its_cpu_budget(api, settings):
    # Rows that are cheap in bytes and costly to check: chat rows of thousands of tiny messages
    settings.COMPRESSOR_UPLOAD_CHECK_CPU_S = 0.05
    row = json.dumps({"messages": [{"role": "user", "content": "a"}] * 20_000}).encode() + b"\n"

    response = _upload(api, row * 40)

    assert response.status_code == 400 and "took too long" in response.json()["file"][0], response.content
    assert not CalibrationDataset.objects.exists()


def test_a_job_naming_a_two_million_row_upload_never_reads_it(api, settings):
    # Given an upload of 2 million rows (above the default bounds, raised for this test), counted once
    settings.COMPRESSOR_MAX_UPLOAD_ROWS = 2_000_000
    settings.COMPRESSOR_UPLOAD_CHECK_CPU_S = 60.0
    uploaded = _upload(api, b'{"text": "a"}\n' * 2_000_000)
    assert uploaded.status_code == 201 and uploaded.json()["rows"] == 2_000_000, uploaded.content

    # When jobs name it (the test client runs the request in this thread: its CPU is this thread's)
    calibration = {"kind": "upload", "dataset_id": uploaded.json()["id"], "samples": 64}
    started = time.thread_time()
    created = api.post("/api/v1/jobs/", {"preset": "int8-w8a8-gptq", "calibration": calibration}, format="json")
    spent = time.thread_time() - started

    # Then the submission is checked against the stored count, well under a second of CPU
    assert created.status_code == 201, created.content
    assert spent < 1.0, f"the submission spent {spent:.2f} s of CPU"


def test_owners_delete_their_uploads_unless_an_active_job_uses_them(
    api, api_for, other_user, user, make_job, django_capture_on_commit_callbacks
):
    from jobs.services import policy

    def upload() -> dict:
        answer = _upload(api, b'{"text": "row of text"}\n' * 100)
        assert answer.status_code == 201
        return answer.json()

    free, in_use, used_before = upload(), upload(), upload()
    active = make_job(user, calibration_kind="upload", calibration_file_id=in_use["id"])
    ended = make_job(
        user, calibration_kind="upload", calibration_file_id=used_before["id"], status=Job.Status.SUCCEEDED
    )
    stored = policy.user_stored_bytes(user)
    stored_file = CalibrationDataset.objects.get(pk=free["id"]).file

    # Another user cannot, the owner can: the row, its file and its bytes in the quota go
    assert api_for(other_user).delete(f"/api/v1/calibration-datasets/{free['id']}/").status_code == 404
    with django_capture_on_commit_callbacks(execute=True):  # the file goes once the row's deletion is committed
        assert api.delete(f"/api/v1/calibration-datasets/{free['id']}/").status_code == 204
    assert not stored_file.storage.exists(stored_file.name)
    assert policy.user_stored_bytes(user) == stored - free["size_bytes"]

    # A queued job's file stays (409 with the reason); an ended job's goes, the job keeps its record
    refused = api.delete(f"/api/v1/calibration-datasets/{in_use['id']}/")
    assert refused.status_code == 409 and "queued or running job" in refused.json()["detail"]
    assert CalibrationDataset.objects.filter(pk=in_use["id"]).exists()
    assert api.delete(f"/api/v1/calibration-datasets/{used_before['id']}/").status_code == 204
    ended.refresh_from_db()
    assert (
        ended.calibration_file is None
        and api.get(f"/api/v1/jobs/{ended.pk}/").json()["calibration"]["dataset_id"] is None
    )
    assert active.status == Job.Status.QUEUED


def test_the_calibration_files_page_deletes_ones_own_uploads(
    client, api, user, other_user, make_job, django_capture_on_commit_callbacks
):
    from jobs.services import storage

    kept = _upload(api, b'{"text": "row"}\n' * 10).json()
    gone = _upload(api, b'{"text": "row"}\n' * 20).json()
    make_job(user, calibration_kind="upload", calibration_file_id=kept["id"])
    theirs = storage.calibration_dataset_create(
        owner=other_user, name="theirs.jsonl", upload=_named(b'{"text": "row"}\n')
    )
    client.force_login(user)

    page = client.get("/calibration-files/").content.decode()
    assert f'name="delete" value="{gone["id"]}"' in page and f'name="delete" value="{kept["id"]}"' in page
    assert f'value="{theirs.pk}"' not in page

    with django_capture_on_commit_callbacks(execute=True):
        deleted = client.post("/calibration-files/", {"delete": gone["id"]}, follow=True).content.decode()
    refused = client.post("/calibration-files/", {"delete": kept["id"]}, follow=True).content.decode()
    not_hers = client.post("/calibration-files/", {"delete": theirs.pk})

    assert "is deleted" in deleted and f'value="{gone["id"]}"' not in deleted
    assert "used by a queued or running job" in refused and f'value="{kept["id"]}"' in refused
    assert not_hers.status_code == 404 and CalibrationDataset.objects.filter(pk=theirs.pk).exists()
    assert 'href="/calibration-files/"' in client.get("/jobs/new/").content.decode()


def _named(content: bytes):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile("rows.jsonl", content)
