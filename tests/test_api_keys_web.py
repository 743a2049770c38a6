"""``manage``-scoped keys on the JSON API: Bearer, no CSRF, the key's team only, audited as the
key; listing is cursor-paged and a deployment is read and stopped by its public UUID."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from accounts.keys import KeySettings, create_api_key, revoke_api_key
from accounts.models import KeyScope, Team
from audit.models import AuditEvent
from deployments.states import State
from gpus.models import Host
from tests.gateway_process import serve

pytestmark = [pytest.mark.django_db, pytest.mark.redis]


@pytest.fixture
def manage_key(team_a: Team) -> str:
    """A manage-scoped key of team A (clear text)."""
    return create_api_key(team_a, KeySettings("ci", scope=KeyScope.MANAGE))[1]


@pytest.fixture
def fleet(team_a: Team, team_b: Team, tmp_path: Path) -> dict[str, Any]:
    """Three deployments of team A and one of team B, queued."""
    host = Host.objects.create(name="gpu-01")
    made = {
        name: serve(team_a, host, tmp_path, name, None, State.QUEUED)
        for name in ("one", "two", "three")
    }
    made["other"] = serve(team_b, host, tmp_path, "other", None, State.QUEUED)
    return made


def _client(key: str | None = None) -> Client:
    """A client that enforces CSRF, as a browser's would: a key must not need it."""
    headers = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key else {}
    return Client(enforce_csrf_checks=True, **headers)


def test_a_manage_key_lists_its_teams_deployments_page_by_page(
    manage_key: str, fleet: dict[str, Any]
) -> None:
    client = _client(manage_key)
    first = client.get("/deployments/api/?limit=2").json()
    assert [d["name"] for d in first["results"]] == ["three", "two"]
    second = client.get(first["next"]).json()
    assert [d["name"] for d in second["results"]] == ["one"]
    assert second["next"] is None
    assert client.get("/deployments/api/?cursor=%%%").status_code == 400


def test_a_deployment_is_read_by_its_public_id_with_its_endpoint(
    manage_key: str, fleet: dict[str, Any], settings: Any
) -> None:
    settings.BERTH_GATEWAY_URL = "https://llm.example.com"
    client = _client(manage_key)
    detail = client.get(f"/deployments/api/{fleet['one'].public_id}/").json()
    assert detail["state"] == "queued"
    assert detail["endpoint"] == {"base_url": "https://llm.example.com/v1", "model": "one"}
    assert "plan" in detail
    assert "diagnosis" in detail
    assert client.get(f"/deployments/api/{fleet['other'].public_id}/").status_code == 404


def test_a_manage_key_stops_without_csrf_and_the_audit_names_the_key(
    manage_key: str, fleet: dict[str, Any]
) -> None:
    answer = _client(manage_key).post(f"/deployments/api/{fleet['two'].public_id}/stop/")
    assert answer.status_code == 202, answer.content
    assert answer.json()["state"] == "stopping"
    event = AuditEvent.objects.filter(action="deployment.stop_requested").get()
    prefix = manage_key.split("_")[1]
    assert event.actor_kind == "key"
    assert event.actor_name == f"key bk_{prefix} (team-a)"
    assert event.actor_id is None
    again = _client(manage_key).post(f"/deployments/api/{fleet['two'].public_id}/stop/")
    assert again.status_code == 409
    other = _client(manage_key).post(f"/deployments/api/{fleet['other'].public_id}/stop/")
    assert other.status_code == 404


def test_a_key_cannot_send_override_reason(manage_key: str, fleet: dict[str, Any]) -> None:
    body = {
        "team": "team-a",
        "model": fleet["one"].model_id,
        "host": "gpu-01",
        "image": "vllm",
        "name": "new",
        "override_reason": "trust me",
    }
    answer = _client(manage_key).post(
        "/deployments/api/", json.dumps(body), content_type="application/json"
    )
    assert answer.status_code == 400
    assert "API key cannot override" in answer.json()["errors"]["override_reason"]


def test_inference_revoked_and_bad_keys_are_refused_and_audited(
    team_a: Team, manage_key: str, fleet: dict[str, Any]
) -> None:
    inference = create_api_key(team_a, KeySettings("gateway"))[1]
    revoked_key, revoked = create_api_key(team_a, KeySettings("old", scope=KeyScope.MANAGE))
    revoke_api_key(revoked_key)
    for presented in (inference, revoked, "bk_00000000_" + "x" * 32, "not-a-key"):
        answer = _client(presented).get("/deployments/api/")
        assert answer.status_code == 401, presented
        assert "manage" in answer.json()["errors"]["key"]
    denied = AuditEvent.objects.filter(action="apikey.denied")
    assert denied.count() == 4
    assert all(event.actor_kind == "key" for event in denied)
    assert _client(manage_key).get("/deployments/api/").status_code == 200
