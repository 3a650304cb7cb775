"""Hostile calibration uploads: malformed, wrongly encoded, empty, one enormous line, over the size limit.
Each is a 400 naming the file with the reason; nothing is stored; an oversized body is not read to its end."""

from __future__ import annotations

import io

import pytest

from jobs.models import CalibrationDataset

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
    ],
    ids=["malformed", "not-an-object", "latin-1", "empty", "blank-lines", "one-100-MB-line"],
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
