"""The API's token check (jobs.api.authentication): DRF's rules, run as one query compiled once per process.

The compiled query is run again with each request's key, so these tests send several users' tokens, a
revoked one and malformed ones through the same process, one after another.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def _job_ids(api) -> list[int]:
    response = api.get("/api/v1/jobs/")
    assert response.status_code == 200, response.content
    return sorted(job["id"] for job in response.json()["results"])


def test_each_token_signs_in_its_own_user(api_for, make_user, make_job):
    alice, bob = make_user("alice"), make_user("bob")
    alices = [make_job(alice).pk, make_job(alice).pk]
    bobs = [make_job(bob).pk]
    alice_api, bob_api = api_for(alice), api_for(bob)

    # Alternating tokens in one process: each request gets its own token's user
    assert _job_ids(alice_api) == alices
    assert _job_ids(bob_api) == bobs
    assert _job_ids(alice_api) == alices


def test_the_request_carries_the_token_as_drf_gives_it(api_for, make_user):
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIRequestFactory

    from jobs.api.authentication import TokenAuthentication

    alice = make_user("alice")
    api_for(alice)
    stored = Token.objects.get(user=alice)
    request = APIRequestFactory().get("/api/v1/jobs/", HTTP_AUTHORIZATION=f"Token {stored.key}")

    user, token = TokenAuthentication().authenticate(request)

    assert user == alice and user.username == "alice"
    assert (token.key, token.user_id, token.created) == (stored.key, alice.pk, stored.created)
    assert token.user is user


@pytest.mark.parametrize(
    "header",
    [
        "Token 0123456789abcdef0123456789abcdef01234567",  # the shape of a key, but nobody's
        "Token <token-key>",  # the compiled query's placeholder itself
        "Token x'OR'1'='1",
    ],
)
def test_an_unknown_token_is_refused_with_drfs_reason(api_for, make_user, make_job, header):
    from rest_framework.test import APIClient

    alice = make_user("alice")
    make_job(alice)
    api_for(alice)  # a real token exists
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)

    response = client.get("/api/v1/jobs/")

    assert response.status_code == 401, response.content
    assert response.json()["detail"] == "Invalid token."


def test_a_revoked_token_and_a_deactivated_users_token_are_refused_at_once(api_for, make_user):
    from rest_framework.authtoken.models import Token

    alice, bob = make_user("alice"), make_user("bob")
    alice_api, bob_api = api_for(alice), api_for(bob)
    assert alice_api.get("/api/v1/jobs/").status_code == 200
    assert bob_api.get("/api/v1/jobs/").status_code == 200

    Token.objects.filter(user=alice).delete()
    bob.is_active = False
    bob.save()

    revoked, deactivated = alice_api.get("/api/v1/jobs/"), bob_api.get("/api/v1/jobs/")
    assert revoked.status_code == 401 and revoked.json()["detail"] == "Invalid token."
    assert deactivated.status_code == 401 and deactivated.json()["detail"] == "User inactive or deleted."
