"""Sign-in, sign-out and failed sign-in are audited with the request id and client address."""

from __future__ import annotations

import pytest
from django.test import Client

from accounts.models import User
from audit.models import AuditEvent
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


def test_login_is_audited_with_request_id_and_address(alice: User) -> None:
    response = Client().post(
        "/accounts/login/", {"username": "alice", "password": PASSWORD}, REMOTE_ADDR="10.1.2.3"
    )
    assert response.status_code == 302
    event = AuditEvent.objects.get(action="auth.login")
    assert (event.actor_id, event.actor_name, event.actor_kind) == (alice.pk, "alice", "user")
    assert event.request_id == response["X-Request-ID"]
    assert event.client_ip == "10.1.2.3"


def test_failed_login_is_denied_and_keeps_no_password(alice: User) -> None:
    response = Client().post(
        "/accounts/login/", {"username": "alice", "password": "wrong-password-123"}
    )
    assert response.status_code == 200
    assert b"Please enter a correct username and password" in response.content
    event = AuditEvent.objects.get(action="auth.login_failed")
    assert (event.outcome, event.actor_name, event.actor_id) == ("denied", "anonymous", None)
    assert event.payload == {"attempted_username": "alice"}
    assert "wrong-password" not in event.payload_json


def test_logout_is_audited(alice: User) -> None:
    client = Client()
    client.force_login(alice)
    response = client.post("/accounts/logout/")
    assert response.status_code == 302
    event = AuditEvent.objects.get(action="auth.logout")
    assert (event.actor_name, event.request_id) == ("alice", response["X-Request-ID"])


def test_forwarded_for_is_ignored_without_a_trusted_proxy(alice: User) -> None:
    Client().post(
        "/accounts/login/",
        {"username": "alice", "password": PASSWORD},
        REMOTE_ADDR="10.0.0.9",
        HTTP_X_FORWARDED_FOR="6.6.6.6",
        HTTP_X_REQUEST_ID="forged-request-id",
    )
    event = AuditEvent.objects.get(action="auth.login")
    assert event.client_ip == "10.0.0.9"
    assert event.request_id != "forged-request-id"


def test_behind_one_proxy_the_last_forwarded_address_is_the_client(alice: User, settings) -> None:
    settings.BERTH_TRUSTED_PROXIES = 1
    response = Client().post(
        "/accounts/login/",
        {"username": "alice", "password": PASSWORD},
        REMOTE_ADDR="10.0.0.1",
        HTTP_X_FORWARDED_FOR="6.6.6.6, 192.0.2.44",
        HTTP_X_REQUEST_ID="edge-1234abcd",
    )
    event = AuditEvent.objects.get(action="auth.login")
    assert event.client_ip == "192.0.2.44"
    assert event.request_id == response["X-Request-ID"] == "edge-1234abcd"


def test_repeated_failures_lock_that_username_from_that_address_only(
    alice: User, bob: User
) -> None:
    attacker = Client(REMOTE_ADDR="10.9.9.9")

    def attempt(client: Client, username: str, password: str) -> int:
        return client.post(
            "/accounts/login/", {"username": username, "password": password}
        ).status_code

    assert [attempt(attacker, "alice", "guess-1234567") for _ in range(4)] == [200] * 4
    assert attempt(attacker, "alice", "guess-1234567") == 429  # the fifth failure locks
    locked = attacker.post("/accounts/login/", {"username": "alice", "password": PASSWORD})
    assert locked.status_code == 429  # even the right password, for the cool-off time
    assert "Too many failed sign-ins" in locked.content.decode()
    event = AuditEvent.objects.filter(action="auth.locked_out").first()
    assert (event.outcome, event.payload["attempted_username"]) == ("denied", "alice")
    # Another user from the same address, and alice from her own address, still get in.
    assert attempt(attacker, "bob", PASSWORD) == 302
    assert attempt(Client(REMOTE_ADDR="10.1.1.1"), "alice", PASSWORD) == 302
