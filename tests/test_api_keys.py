"""API keys: their form, storage, lifecycle and audit, and ``manage.py create_api_key``."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from accounts import keys
from accounts.keys import KeySettings, create_api_key, revoke_api_key, rotate_api_key
from accounts.models import ApiKey, KeyScope, Team, User
from accounts.services import remove_member
from audit.models import AuditEvent
from tests.conftest import run_manage, subprocess_env

pytestmark = pytest.mark.django_db


def test_a_key_has_the_documented_form_and_only_its_hash_is_stored(team_a: Team) -> None:
    key, clear = create_api_key(team_a, KeySettings("ci"))
    assert keys.KEY_PATTERN.fullmatch(clear)
    head, prefix, secret = clear.split("_", 2)
    assert head == "bk"
    assert prefix == key.prefix
    assert len(secret) * 6 >= 128  # base64url: 6 bits a character
    stored = ApiKey.objects.get(pk=key.pk)
    assert stored.secret_hash == keys.hash_key(clear)
    assert secret not in stored.secret_hash
    event = AuditEvent.objects.get(action="apikey.created")
    assert clear not in event.payload_json
    assert secret not in event.payload_json
    assert event.payload["prefix"] == key.prefix


def test_two_keys_never_share_a_secret(team_a: Team) -> None:
    clears = {create_api_key(team_a, KeySettings(f"k{i}"))[1] for i in range(20)}
    assert len(clears) == 20
    assert len({c.split("_")[1] for c in clears}) == 20


def test_authenticate_accepts_only_the_exact_usable_key_of_its_scope(team_a: Team) -> None:
    key, clear = create_api_key(team_a, KeySettings("ci", scope=KeyScope.MANAGE))
    assert keys.authenticate(clear, KeyScope.MANAGE) == key
    assert keys.authenticate(clear, KeyScope.INFERENCE) is None
    tampered = clear[:-1] + ("A" if clear[-1] != "A" else "B")
    assert keys.authenticate(tampered, KeyScope.MANAGE) is None
    assert keys.authenticate("bk_nothex!!_x", KeyScope.MANAGE) is None
    revoke_api_key(key)
    assert keys.authenticate(clear, KeyScope.MANAGE) is None


def test_invalid_settings_are_refused_naming_the_field_and_audited(team_a: Team) -> None:
    with pytest.raises(ValidationError) as caught:
        create_api_key(team_a, KeySettings("", model_names=("Bad Name",), rpm=0, expires_days=0))
    assert set(caught.value.message_dict) == {"name", "models", "rpm", "expires_days"}
    denied = AuditEvent.objects.get(action="apikey.created")
    assert denied.outcome == "denied"
    assert "models" in denied.payload["reason"]
    assert not ApiKey.objects.exists()


def test_revoking_is_audited_once(team_a: Team) -> None:
    key, _ = create_api_key(team_a, KeySettings("ci"))
    assert revoke_api_key(key) is True
    assert revoke_api_key(key) is False
    assert AuditEvent.objects.filter(action="apikey.revoked").count() == 1


def test_rotation_revokes_the_old_key_and_keeps_its_settings(team_a: Team) -> None:
    old, _ = create_api_key(team_a, KeySettings("ci", model_names=("llama",), rpm=5, tpm=100))
    new, clear = rotate_api_key(old)
    old.refresh_from_db()
    assert old.revoked_at is not None
    assert (new.model_names, new.rpm, new.tpm, new.name) == (["llama"], 5, 100, "ci")
    assert keys.authenticate(clear, KeyScope.INFERENCE) == new
    with pytest.raises(ValidationError):
        rotate_api_key(old)
    assert AuditEvent.objects.filter(action="apikey.rotated").count() == 1


def test_expiry_is_audited_once_per_key(team_a: Team) -> None:
    key, _ = create_api_key(team_a, KeySettings("short", expires_days=1))
    later = timezone.now() + timedelta(days=2)
    assert keys.record_expired(now=later) == 1
    assert keys.record_expired(now=later) == 0
    event = AuditEvent.objects.get(action="apikey.expired")
    assert event.payload["prefix"] == key.prefix
    assert event.team_slug == team_a.slug


def test_a_key_outlives_its_creator_leaving_the_team(team_a: Team, alice: User) -> None:
    _, clear = create_api_key(team_a, KeySettings("ci"), created_by=alice)
    remove_member(team_a, alice)
    assert keys.authenticate(clear, KeyScope.INFERENCE) is not None


def test_a_refusal_is_audited_with_the_key_as_actor(team_a: Team) -> None:
    keys.record_denied("1a2b3c4d", "expired", team=team_a)
    event = AuditEvent.objects.get(action="apikey.denied")
    assert (event.actor_kind, event.actor_name) == ("key", "key bk_1a2b3c4d")
    assert event.outcome == "denied"
    assert event.team_slug == "team-a"


@pytest.mark.django_db(transaction=True)
def test_create_api_key_prints_the_documented_json(team_a: Team) -> None:
    result = run_manage(
        "create_api_key", "--team", "team-a", "--name", "ci", "--models", "llama,qwen",
        "--expires-days", "30", "--scope", "manage", "--rpm", "60", "--json",
        env=subprocess_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert set(printed) == {"id", "key", "prefix", "scope", "expires"}
    key = ApiKey.objects.get(public_id=printed["id"])
    assert printed["key"].startswith(f"bk_{key.prefix}_")
    assert (printed["scope"], key.model_names, key.rpm) == ("manage", ["llama", "qwen"], 60)
    assert printed["expires"] == key.expires.isoformat()

    refused = run_manage("create_api_key", "--team", "team-a", "--name", "x",
                         "--models", "NOT OK", env=subprocess_env())  # fmt: skip
    assert refused.returncode != 0
    assert "--models" in refused.stderr
    missing = run_manage("create_api_key", "--team", "nope", "--name", "x", env=subprocess_env())
    assert "--team" in missing.stderr
