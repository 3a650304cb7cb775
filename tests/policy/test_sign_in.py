"""Sign-in: failed password sign-ins are limited per account and address (shared cache); API tokens can be
rotated and revoked by their owner."""

from __future__ import annotations

import pytest
from django.test import Client


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """Sign-ins hash passwords many times here; the hasher's cost is not what these tests are about."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def sign_in(client: Client, username: str, password: str):
    return client.post("/accounts/login/", {"username": username, "password": password})


def test_failed_sign_ins_lock_the_account_for_a_while(make_user, settings):
    # Given at most 3 failed sign-ins per account in 15 minutes
    settings.COMPRESSOR_LOGIN_FAILURE_RATE = "3/15m"
    make_user("alice", is_staff=True)
    browser = Client()

    # When someone guesses wrong 3 times
    assert [sign_in(browser, "alice", f"guess-{i}").status_code for i in range(3)] == [200, 200, 200]

    # Then even the right password is refused, with the reason, on the page, in the admin and the API login
    refused = sign_in(browser, "alice", "pw-for-tests")
    assert refused.status_code == 200 and "Too many failed sign-ins" in refused.content.decode()
    assert "_auth_user_id" not in browser.session
    admin = Client()
    assert admin.post("/admin/login/", {"username": "alice", "password": "pw-for-tests"}).status_code == 200
    assert "_auth_user_id" not in admin.session
    api_login = Client()
    api_login.post("/api/v1/auth/login/", {"username": "alice", "password": "pw-for-tests"})
    assert "_auth_user_id" not in api_login.session
    # Another account is not affected
    make_user("bob")
    assert sign_in(Client(), "bob", "pw-for-tests").status_code == 302


def test_failed_sign_ins_from_one_address_are_limited_across_accounts(make_user, settings):
    settings.COMPRESSOR_LOGIN_FAILURE_RATE_PER_ADDRESS = "4/15m"
    make_user("carol")
    attacker = Client(REMOTE_ADDR="203.0.113.9")
    for name in ("a", "b", "c", "d"):
        sign_in(attacker, name, "guess")

    assert "Too many failed sign-ins" in sign_in(attacker, "carol", "pw-for-tests").content.decode()
    assert sign_in(Client(REMOTE_ADDR="198.51.100.7"), "carol", "pw-for-tests").status_code == 302


def test_a_token_can_be_rotated_and_revoked(make_user, api_for):
    alice = make_user("alice")
    old = api_for(alice)

    # Rotating gives a new key; the old one stops working at once
    new_key = old.post("/api/v1/token/").json()["token"]
    assert old.get("/api/v1/jobs/").status_code == 401
    new = Client(HTTP_AUTHORIZATION=f"Token {new_key}")
    assert new.get("/api/v1/jobs/").status_code == 200

    # Revoking leaves no working token
    assert new.delete("/api/v1/token/").status_code == 204
    assert new.get("/api/v1/jobs/").status_code == 401
