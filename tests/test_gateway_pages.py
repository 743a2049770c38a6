"""The gateway's pages: a team's keys (made, shown once, rotated, revoked) and usage, a model's
usage by team, the CSV export, and each deployment's endpoint with its curl line."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from accounts.keys import KeySettings, create_api_key
from accounts.models import ApiKey, Team, User
from audit.models import AuditEvent
from deployments.states import State
from gateway.usage import UsageRecord, apply
from gpus.models import Host
from tests.gateway_process import serve

pytestmark = pytest.mark.django_db


def _signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_a_member_makes_a_key_that_is_shown_once(alice: User, team_a: Team) -> None:
    client = _signed_in(alice)
    made = client.post(
        "/gateway/teams/team-a/",
        {"name": "notebook", "scope": "inference", "models": "llama", "rpm": "60"},
    )
    assert made.status_code == 201
    key = ApiKey.objects.get()
    clear = made.context["shown_once"]
    assert clear.startswith(f"bk_{key.prefix}_")
    assert clear in made.content.decode()
    again = client.get("/gateway/teams/team-a/").content.decode()
    assert clear not in again  # never shown again
    assert f"bk_{key.prefix}_…" in again
    event = AuditEvent.objects.get(action="apikey.created")
    assert (event.actor_name, event.team_slug) == ("alice", "team-a")
    assert key.created_by == alice
    assert key.model_names == ["llama"]


def test_a_bad_value_is_refused_naming_the_field_and_audited(alice: User, team_a: Team) -> None:
    answer = _signed_in(alice).post(
        "/gateway/teams/team-a/", {"name": "x", "scope": "inference", "models": "Not A Slug"}
    )
    assert answer.status_code == 200
    assert answer.context["form"].errors["models"]
    assert not ApiKey.objects.exists()
    assert AuditEvent.objects.get(action="apikey.created").outcome == "denied"


def test_rotating_shows_the_new_key_and_revoking_ends_it(alice: User, team_a: Team) -> None:
    old, _ = create_api_key(team_a, KeySettings("ci", rpm=5))
    client = _signed_in(alice)
    rotated = client.post(f"/gateway/keys/{old.public_id}/rotate/")
    assert rotated.status_code == 201
    new = ApiKey.objects.get(revoked_at__isnull=True)
    assert rotated.context["shown_once"].startswith(f"bk_{new.prefix}_")
    assert new.rpm == 5
    revoked = client.post(f"/gateway/keys/{new.public_id}/revoke/")
    assert revoked.status_code == 302
    assert not ApiKey.objects.filter(revoked_at__isnull=True).exists()


def test_another_teams_keys_are_not_found(bob: User, team_a: Team) -> None:
    key, _ = create_api_key(team_a, KeySettings("ci"))
    client = _signed_in(bob)
    assert client.get("/gateway/teams/team-a/").status_code == 404
    assert client.post(f"/gateway/keys/{key.public_id}/revoke/").status_code == 404
    key.refresh_from_db()
    assert key.revoked_at is None


def _usage(team: Team, deployment_id: int, prefix: str, tokens: int) -> UsageRecord:
    return UsageRecord(
        time.time(), team.pk, prefix, "llama", deployment_id, 0, 200, tokens, tokens, 40.0, 10.0
    )


def test_usage_by_key_and_model_the_month_and_the_export(
    alice: User, team_a: Team, tmp_path: Path, django_assert_max_num_queries: Any
) -> None:
    deployment = serve(
        team_a, Host.objects.create(name="gpu-01"), tmp_path, "llama", 30001, State.QUEUED
    )
    keys = [create_api_key(team_a, KeySettings(f"k{i}"))[0] for i in range(5)]
    apply([_usage(team_a, deployment.pk, key.prefix, 10) for key in keys for _ in range(3)])
    client = _signed_in(alice)
    with django_assert_max_num_queries(14):
        page = client.get("/gateway/teams/team-a/")
    by_model = list(page.context["by_model"])
    assert by_model[0]["requests"] == 15
    assert by_model[0]["completion_tokens"] == 150
    assert len(page.context["by_key"]) == 5
    assert page.context["month_tokens"] == 300
    exported = b"".join(client.get("/gateway/teams/team-a/usage.csv").streaming_content)
    rows = list(csv.DictReader(io.StringIO(exported.decode())))
    assert sum(int(row["requests"]) for row in rows) == 15
    assert {row["key_prefix"] for row in rows} == {key.prefix for key in keys}

    usage = client.get(f"/gateway/models/{deployment.model_id}/")
    assert [(row["team__slug"], row["requests"]) for row in usage.context["by_team"]] == [
        ("team-a", 15)
    ]


def test_the_deployment_page_gives_the_endpoint_and_a_curl_line(
    alice: User, team_a: Team, tmp_path: Path, settings: Any
) -> None:
    settings.BERTH_GATEWAY_URL = "https://llm.example.com"
    deployment = serve(
        team_a, Host.objects.create(name="gpu-01"), tmp_path, "llama", 30001, State.QUEUED
    )
    page = _signed_in(alice).get(f"/deployments/{deployment.public_id}/")
    curl = page.context["curl_line"]
    assert curl.startswith("curl -sS https://llm.example.com/v1/chat/completions ")
    assert '"Authorization: Bearer $BERTH_API_KEY"' in curl
    assert '"model": "llama"' in curl
    assert deployment.engine_key == "" or deployment.engine_key not in page.content.decode()
