"""The pages' refusals: a push and a hub token refused by the services are shown in
words by the one mapping the other pages use (frontend.views._refusal_shown), never as an error page."""

from __future__ import annotations

import html

import pytest

from jobs.models import HubPush, HubToken

pytestmark = pytest.mark.django_db


def _followed(response) -> str:
    return html.unescape(response.content.decode())


def test_a_push_without_a_hub_token_is_refused_on_the_job_page(client_for, alice, succeeded_job):
    job = succeeded_job(alice)

    response = client_for(alice).post(f"/jobs/{job.pk}/push/", {"repo_id": "alice/tiny-fp8"}, follow=True)

    assert response.redirect_chain[-1][0] == f"/jobs/{job.pk}/#pushes"
    assert "Set your hub token first (a token with write access)." in _followed(response)
    assert not HubPush.objects.exists()


def test_a_hub_token_too_short_is_refused_beside_its_field(client_for, alice):
    response = client_for(alice).post("/hub-token/", {"token": "hf_short"})

    assert response.status_code == 400
    page = _followed(response)
    assert "A hub token is 12 to" in page and 'aria-invalid="true"' in page
    assert not HubToken.objects.exists()
