"""A 500's traceback is logged to stderr (the container log) and mailed to ADMINS."""

from __future__ import annotations

import io
import logging

import pytest
from django.test import Client
from django.urls import path


def boom(request):
    raise RuntimeError("the disk caught fire")


urlpatterns = [path("boom/", boom)]


@pytest.mark.urls(__name__)
def test_a_server_error_is_logged_to_stderr_with_its_traceback_and_mailed_to_admins(db, settings, mailoutbox):
    settings.ADMINS = [("ops", "ops@example.org")]
    (stderr,) = [handler for handler in logging.getLogger("django").handlers if handler.name == "stderr"]
    captured = io.StringIO()
    original = stderr.setStream(captured)
    try:
        response = Client(raise_request_exception=False).get("/boom/")
    finally:
        stderr.setStream(original)

    assert response.status_code == 500
    log = captured.getvalue()
    assert "Internal Server Error: /boom/" in log and "Traceback" in log and "the disk caught fire" in log
    assert [mail.to for mail in mailoutbox] == [["ops@example.org"]] and "the disk caught fire" in mailoutbox[0].body
