"""A failed push to a hub says what happened in a sentence a user can act on, never Python's words
(`ConnectError: [Errno -2] Name or service not known`), and never the token."""

from __future__ import annotations

import socket

import pytest

pytestmark = pytest.mark.django_db

PYTHON_WORDS = ("Error", "Errno", "Exception", "Traceback")


def _pushed_to(api, user, make_job, checkpoint, settings, endpoint: str):
    from jobs.hub_push import hub_push_run

    settings.COMPRESSOR_HUB_ENDPOINT = endpoint
    job = make_job(user)
    checkpoint(job)
    assert api.put("/api/v1/hub-token/", {"token": "hf_alices-token-0123456789"}, format="json").status_code == 200
    queued = api.post(f"/api/v1/jobs/{job.pk}/push/", {"repo_id": "alice/model"}, format="json").json()
    return hub_push_run(push_id=queued["id"])


def test_a_hub_whose_name_does_not_resolve_fails_the_push_in_a_sentence(
    api, user, make_job, checkpoint, settings, monkeypatch
):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once, at import
    push = _pushed_to(api, user, make_job, checkpoint, settings, "http://no-such-hub.invalid")

    assert push.status == "failed"
    assert push.error == (
        "The hub (http://no-such-hub.invalid) could not be reached: this server finds no address for its name; "
        "push again later, and tell an operator if it keeps failing."
    )


def test_each_network_failure_is_a_sentence_without_pythons_words():
    import httpx

    from jobs.hub_push import hub_error

    with socket.socket() as silent:  # accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()
        failures = {}
        for name, url, timeout in [
            ("refused", f"http://127.0.0.1:{closed_port}/", 5),
            ("silent", f"http://127.0.0.1:{silent.getsockname()[1]}/", 0.3),
            ("dns", "http://no-such-hub.invalid/", 5),
        ]:
            with pytest.raises(httpx.TransportError) as raised:
                httpx.get(url, timeout=timeout)
            failures[name] = hub_error(raised.value, repo_id="alice/model", endpoint="https://hub.example")
    from huggingface_hub.errors import OfflineModeIsEnabled

    failures["offline"] = hub_error(OfflineModeIsEnabled("offline"), repo_id="alice/model", endpoint="h")
    failures["unexpected"] = hub_error(
        RuntimeError("boom at /srv/secret/path"), repo_id="alice/model", endpoint="https://hub.example"
    )

    assert "nothing answered at its address" in failures["refused"]
    assert "did not answer in time" in failures["silent"]
    assert "finds no address for its name" in failures["dns"]
    assert failures["unexpected"].startswith("The push to alice/model stopped on an unexpected error;")
    assert "could not be reached: this server works offline" in failures["offline"]
    for text in failures.values():
        assert not any(word in text for word in PYTHON_WORDS) and "/srv" not in text, text
        assert text.endswith("push again later, and tell an operator if it keeps failing."), text
