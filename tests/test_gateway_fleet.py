"""Two real ``manage.py berth_gateway`` processes on separate ports, as behind one load
balancer: a key's limit, its team's budget and a revocation hold across both, not per process.
The engine is ``tests/upstream.py`` (vLLM-like, not vLLM)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from accounts.keys import KeySettings, create_api_key, revoke_api_key
from accounts.models import Team
from deployments.states import State
from gpus.models import Host
from tests.gateway_process import GatewayProcess, Upstream, serve

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

EMBEDDING = {"model": "llama", "input": "x"}


@pytest.fixture
def llama(team_a: Team, tmp_path: Path) -> Iterator[Any]:
    """Team A's ready deployment ``llama`` on an upstream answering 5 tokens at once."""
    engine = Upstream("--tokens", "5")
    yield serve(
        team_a, Host.objects.create(name="local"), tmp_path, "llama", engine.port, State.READY
    )
    engine.stop()


@pytest.fixture
def fleet(redis_client: Redis) -> Iterator[list[GatewayProcess]]:
    """Two gateway processes on the same database and Redis."""
    first = GatewayProcess()
    try:
        second = GatewayProcess()
    except Exception:
        first.stop()
        raise
    yield [first, second]
    first.stop()
    second.stop()


def _error(body: bytes) -> dict[str, Any]:
    return json.loads(body)["error"]


def _wait_until_served(gateways: list[GatewayProcess], key: str) -> None:
    """Each gateway reloads its keys on the change it is told about; wait until both know ours
    (GET /v1/models is not counted against the limits)."""
    end = time.monotonic() + 10
    while time.monotonic() < end:
        answers = [g.request("GET", "/v1/models", key=key) for g in gateways]
        if all(status == 200 and b'"llama"' in body for status, _, body in answers):
            return
        time.sleep(0.05)
    raise AssertionError("the gateways did not pick up the key")


def test_a_keys_rpm_holds_across_two_gateways(
    llama: Any, team_a: Team, fleet: list[GatewayProcess]
) -> None:
    _, clear = create_api_key(team_a, KeySettings("fleet", rpm=4))
    _wait_until_served(fleet, clear)
    answers = [
        fleet[i % 2].request("POST", "/v1/embeddings", EMBEDDING, key=clear) for i in range(6)
    ]
    assert [status for status, _, _ in answers] == [200, 200, 200, 200, 429, 429]
    for _, headers, body in answers[4:]:
        assert 1 <= int(headers["retry-after"]) <= 61
        assert _error(body)["code"] == "rate_limit_exceeded"


def test_a_teams_budget_holds_across_two_gateways(
    llama: Any, team_a: Team, fleet: list[GatewayProcess]
) -> None:
    Team.objects.filter(pk=team_a.pk).update(monthly_token_budget=50)
    _, clear = create_api_key(team_a, KeySettings("budget"))
    _wait_until_served(fleet, clear)
    first = fleet[0].chat(clear, "llama", max_tokens=5)
    assert first[0] == 200, first  # ~27 tokens used of 50
    # ~32 tokens reserved: within 50 for a gateway counting alone, over it with the first's.
    second = fleet[1].chat(clear, "llama", max_tokens=10)
    assert second[0] == 429, second
    assert _error(second[2])["type"] == "insufficient_quota"
    assert int(second[1]["retry-after"]) > 0


def test_a_revocation_reaches_both_gateways_within_a_second(
    llama: Any, team_a: Team, fleet: list[GatewayProcess]
) -> None:
    key, clear = create_api_key(team_a, KeySettings("fleet"))
    _wait_until_served(fleet, clear)
    revoke_api_key(key)
    revoked_at = time.monotonic()
    refused_after: dict[int, float] = {}
    while len(refused_after) < 2 and time.monotonic() - revoked_at < 3:
        for index, gateway in enumerate(fleet):
            if index not in refused_after:
                status, _, body = gateway.request("GET", "/v1/models", key=clear)
                if status == 401:
                    assert _error(body)["code"] == "invalid_api_key"
                    refused_after[index] = time.monotonic() - revoked_at
        time.sleep(0.02)
    assert sorted(refused_after) == [0, 1], f"still served after 3 s: {refused_after}"
    assert max(refused_after.values()) < 1.0, refused_after
