"""The gateway as users meet it: the real ``manage.py berth_gateway`` process in front of a
vLLM-like upstream (``tests/upstream.py``, not vLLM), on this test's database and Redis."""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from accounts.keys import KeySettings, create_api_key, revoke_api_key
from accounts.models import ApiKey, Team
from audit.models import AuditEvent
from deployments.models import Deployment
from deployments.runtime.launcher import ensure_engine_key
from deployments.states import State
from gateway.models import UsageMinute
from gpus.models import Host
from tests.gateway_process import (
    METRICS_TOKEN,
    GatewayProcess,
    SeverableProxy,
    Upstream,
    serve,
    walk,
)

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """A vLLM-like engine streaming 5 tokens, 100 ms apart."""
    engine = Upstream("--tokens", "5", "--token-delay-ms", "100")
    yield engine
    engine.stop()


@pytest.fixture
def host(db: None) -> Host:
    """This machine as a GPU host (engines on BERTH_ENGINE_BIND, the loopback)."""
    return Host.objects.create(name="local")


@pytest.fixture
def llama(team_a: Team, host: Host, upstream: Upstream, tmp_path: Path) -> Any:
    """Team A's ready deployment ``llama`` on the upstream."""
    return serve(team_a, host, tmp_path, "llama", upstream.port, State.READY)


@pytest.fixture
def key_a(team_a: Team) -> tuple[ApiKey, str]:
    """An inference key of team A, limited to 3 requests a minute."""
    return create_api_key(team_a, KeySettings("tests", rpm=3))


@pytest.fixture
def gateway(redis_client: Redis) -> Iterator[GatewayProcess]:
    """The gateway process, holding requests for loading models up to 8 s."""
    process = GatewayProcess(BERTH_GATEWAY_HOLD_S="8")
    yield process
    process.stop()


def _error(body: bytes) -> dict[str, Any]:
    return json.loads(body)["error"]


def test_a_key_reaches_its_teams_model_and_gets_404_for_another_teams(
    llama: Any,
    team_b: Team,
    host: Host,
    upstream: Upstream,
    tmp_path: Path,
    key_a: tuple[ApiKey, str],
    gateway: GatewayProcess,
) -> None:
    # Another host record on this machine: one port serves one live deployment per host.
    second = Host.objects.create(name="local-2")
    serve(team_b, second, tmp_path, "qwen", upstream.port, State.READY)
    _, clear = key_a
    gateway_models = _wait_for_models(gateway, clear, {"llama"})
    assert gateway_models == ["llama"]  # team B's qwen is not listed

    status, headers, body = gateway.chat(clear, "llama")
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"] == "tok " * 5
    assert float(headers["x-berth-overhead-ms"]) >= 0

    other_status, _, other_body = gateway.chat(clear, "qwen")
    missing_status, _, missing_body = gateway.chat(clear, "does-not-exist")
    assert other_status == missing_status == 404
    assert _error(other_body)["code"] == _error(missing_body)["code"] == "model_not_found"
    # Nothing in the answer tells an existing model of another team from a missing one.
    assert _error(other_body)["message"].replace("qwen", "X") == _error(missing_body)[
        "message"
    ].replace("does-not-exist", "X")


def test_a_revoked_key_is_refused_within_a_second(
    llama: Any, key_a: tuple[ApiKey, str], gateway: GatewayProcess
) -> None:
    key, clear = key_a
    assert gateway.request("GET", "/v1/models", key=clear)[0] == 200
    revoke_api_key(key)
    revoked_at = time.monotonic()
    while time.monotonic() - revoked_at < 3:
        status, _, body = gateway.request("GET", "/v1/models", key=clear)
        if status == 401:
            break
        time.sleep(0.02)
    took = time.monotonic() - revoked_at
    assert status == 401
    assert _error(body)["code"] == "invalid_api_key"
    assert took < 1.0, f"the revoked key still worked {took:.2f} s later"
    denied = _wait(lambda: AuditEvent.objects.filter(action="apikey.denied").first())
    assert denied.actor_kind == "key"
    assert denied.payload["prefix"] == key.prefix
    assert clear not in denied.payload_json
    assert clear not in gateway.output()


def test_a_stream_passes_token_by_token_and_its_usage_is_recorded(
    llama: Any, key_a: tuple[ApiKey, str], gateway: GatewayProcess, redis_client: Redis
) -> None:
    key, clear = key_a
    _wait_for_models(gateway, clear, {"llama"})
    events = _stream(
        gateway,
        clear,
        {"model": "llama", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    )
    data = [payload for _, payload in events]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["tok "] * 5
    assert all("usage" not in c for c in chunks)  # the client did not ask: the extra chunk is gone
    # Unbuffered: each token reached the client about when the engine sent it (100 ms apart).
    arrivals = [at for at, _ in events[:5]]
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert min(gaps) > 0.05, gaps

    asked = _stream(
        gateway,
        clear,
        {
            "model": "llama",
            "stream": True,
            "messages": [],
            "stream_options": {"include_usage": True},
        },
    )
    usage_chunk = json.loads(asked[-2][1])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5

    row = _wait(lambda: UsageMinute.objects.filter(key_prefix=key.prefix, requests=2).first())
    assert row.completion_tokens == 10
    assert row.model == "llama"
    assert row.ttft_count == 2
    assert row.deployment_id == llama.pk
    assert row.team_id == key.team_id
    key.refresh_from_db()
    assert key.last_used_at is not None


def test_over_the_rpm_limit_answers_429_with_retry_after(
    llama: Any, key_a: tuple[ApiKey, str], gateway: GatewayProcess
) -> None:
    _, clear = key_a
    _wait_for_models(gateway, clear, {"llama"})  # GET /v1/models is not counted
    statuses = [
        gateway.request("POST", "/v1/embeddings", {"model": "llama", "input": "x"}, key=clear)[:2]
        for _ in range(4)
    ]
    assert [status for status, _ in statuses[:3]] == [200, 200, 200]
    status, headers = statuses[3]
    assert status == 429
    assert 1 <= int(headers["retry-after"]) <= 61  # the window counts whole seconds
    body = gateway.request("POST", "/v1/embeddings", {"model": "llama", "input": "x"}, key=clear)
    assert body[0] == 429
    assert _error(body[2])["code"] == "rate_limit_exceeded"


def test_a_team_over_its_monthly_budget_gets_insufficient_quota(
    llama: Any, team_a: Team, gateway: GatewayProcess
) -> None:
    Team.objects.filter(pk=team_a.pk).update(monthly_token_budget=50)
    _, clear = create_api_key(team_a, KeySettings("budget"))  # publishes: the gateway reloads
    _wait_for_models(gateway, clear, {"llama"})
    first = gateway.chat(clear, "llama", max_tokens=5)
    assert first[0] == 200  # ~25 tokens reserved, ~20 used
    second = gateway.chat(clear, "llama", max_tokens=40)
    assert second[0] == 429
    assert _error(second[2])["type"] == "insufficient_quota"
    assert int(second[1]["retry-after"]) > 0


def test_a_request_for_a_loading_model_is_held_and_answered_once_ready(
    team_a: Team,
    host: Host,
    upstream: Upstream,
    tmp_path: Path,
    key_a: tuple[ApiKey, str],
    gateway: GatewayProcess,
) -> None:
    loading = serve(team_a, host, tmp_path, "llama", upstream.port, State.LOADING)
    _, clear = key_a
    _wait_for_models(gateway, clear, {"llama"})
    result: dict[str, Any] = {}

    def ask() -> None:
        started = time.monotonic()
        result["answer"] = gateway.chat(clear, "llama")
        result["took"] = time.monotonic() - started

    asking = threading.Thread(target=ask)
    asking.start()
    time.sleep(1.5)
    assert asking.is_alive(), "the request was not held while the model loads"
    walk(loading, State.READY)
    asking.join(10)
    assert result["answer"][0] == 200, result
    assert 1.5 <= result["took"] < 5


def test_a_model_that_stays_loading_answers_503_model_not_ready_after_the_hold(
    team_a: Team,
    host: Host,
    upstream: Upstream,
    tmp_path: Path,
    key_a: tuple[ApiKey, str],
) -> None:
    serve(team_a, host, tmp_path, "slow", upstream.port, State.LOADING)
    _, clear = key_a
    process = GatewayProcess(BERTH_GATEWAY_HOLD_S="1")
    try:
        started = time.monotonic()
        status, _, body = process.chat(clear, "slow")
        took = time.monotonic() - started
    finally:
        process.stop()
    error = _error(body)
    assert status == 503
    assert error["type"] == "model_not_ready"
    assert error["state"] == "loading"
    assert "expected_ready_in_s" in error
    assert 1 <= took < 4


def test_a_failed_model_answers_503_with_its_diagnosis(
    team_a: Team,
    host: Host,
    upstream: Upstream,
    tmp_path: Path,
    key_a: tuple[ApiKey, str],
    gateway: GatewayProcess,
) -> None:
    broken = serve(team_a, host, tmp_path, "broken", upstream.port, State.LOADING)
    walk(broken, State.FAILED)
    _, clear = key_a
    _status, _, body = _wait_for_status(gateway, clear, "broken", 503)
    error = _error(body)
    assert error["state"] == "failed"
    assert error["code"] == "model_not_ready"
    assert error["diagnosis"][0]["code"] == "cuda-oom"
    assert "exited with code 1" in error["message"]


def test_an_engine_killed_mid_stream_ends_the_stream_cleanly(
    team_a: Team, host: Host, tmp_path: Path, key_a: tuple[ApiKey, str], gateway: GatewayProcess
) -> None:
    engine = Upstream("--tokens", "50", "--token-delay-ms", "100")
    try:
        serve(team_a, host, tmp_path, "llama", engine.port, State.READY)
        _, clear = key_a
        _wait_for_models(gateway, clear, {"llama"})
        threading.Timer(0.5, engine.process.kill).start()
        started = time.monotonic()
        events = _stream(gateway, clear, {"model": "llama", "stream": True, "messages": []})
        took = time.monotonic() - started
    finally:
        engine.stop()
    assert took < 3, "the stream hung after its engine died"
    assert 2 <= len(events) < 50
    assert json.loads(events[-1][1])["error"]["code"] == "upstream_broken"
    status, _, body = gateway.chat(clear, "llama")
    assert status in (502, 503), body  # the engine is gone: a clean error, at once


def test_only_the_gateway_holds_the_engine_key(
    team_a: Team, host: Host, tmp_path: Path, key_a: tuple[ApiKey, str], gateway: GatewayProcess
) -> None:
    built = serve(team_a, host, tmp_path, "llama", None, State.PENDING)
    ensure_engine_key(built)  # what the launcher does before creating the container
    engine = Upstream("--api-key", built.engine_key)
    try:
        Deployment.objects.filter(pk=built.pk).update(host_port=engine.port)
        walk(built, State.READY)
        _, clear = key_a
        _wait_for_models(gateway, clear, {"llama"})
        status, headers, body = gateway.chat(clear, "llama")
        direct = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=10)
        direct.request(
            "POST", "/v1/chat/completions", body=b"{}", headers={"Authorization": f"Bearer {clear}"}
        )
        refused = direct.getresponse().status
        direct.close()
    finally:
        engine.stop()
    assert status == 200, body
    assert refused == 401  # the engine's port, reached past the gateway, with a Berth key
    assert built.engine_key not in json.dumps(headers) + body.decode()


def test_metrics_need_the_token_and_count_requests(
    llama: Any, key_a: tuple[ApiKey, str], gateway: GatewayProcess
) -> None:
    _, clear = key_a
    _wait_for_models(gateway, clear, {"llama"})
    assert gateway.chat(clear, "llama")[0] == 200
    assert gateway.request("GET", "/metrics")[0] == 403
    connection = gateway.connection()
    connection.request("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    text = connection.getresponse().read().decode()
    connection.close()
    assert 'berth_gateway_requests_total{model="llama",status="200"} 1.0' in text
    assert 'berth_gateway_tokens_total{kind="completion",model="llama"} 5.0' in text
    assert "berth_gateway_overhead_seconds_bucket" in text


# --- helpers ----------------------------------------------------------------------------------


def _wait(fetch: Any, deadline_s: float = 10) -> Any:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        found = fetch()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("not seen in time")


def _wait_for_models(gateway: GatewayProcess, key: str, wanted: set[str]) -> list[str]:
    """The gateway reloads on each change it is told about; wait until it has ours."""

    def listed() -> list[str] | None:
        status, _, body = gateway.request("GET", "/v1/models", key=key)
        names = [card["id"] for card in json.loads(body)["data"]] if status == 200 else []
        return names if wanted <= set(names) else None

    return _wait(listed)


def _wait_for_status(gateway: GatewayProcess, key: str, model: str, status: int) -> tuple:
    def answer() -> tuple | None:
        result = gateway.chat(key, model)
        return result if result[0] == status else None

    return _wait(answer)


def _stream(gateway: GatewayProcess, key: str, body: dict) -> list[tuple[float, str]]:
    """(arrival time, data) of each server-sent event, read as they arrive."""
    connection = gateway.connection()
    connection.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    response = connection.getresponse()
    assert response.status == 200, response.read()
    assert "x-berth-overhead-ms" in {k.lower() for k, _ in response.getheaders()}
    events = []
    while line := response.readline():
        if line.startswith(b"data: "):
            events.append((time.monotonic(), line[6:].strip().decode()))
    connection.close()
    return events


@pytest.mark.postgres
def test_the_gateway_serves_from_its_cache_while_the_database_is_down(
    llama: Any, team_a: Team, key_a: tuple[ApiKey, str]
) -> None:
    from django.db import connection

    settings_dict = connection.settings_dict
    proxy = SeverableProxy(
        (settings_dict["HOST"] or "127.0.0.1", int(settings_dict["PORT"] or 5432))
    )
    auth = settings_dict["USER"] + (
        f":{settings_dict['PASSWORD']}" if settings_dict["PASSWORD"] else ""
    )
    url = f"postgres://{auth}@127.0.0.1:{proxy.port}/{settings_dict['NAME']}"
    process = GatewayProcess(DATABASE_URL=url)
    try:
        _, clear = key_a
        _wait_for_models(process, clear, {"llama"})
        proxy.cut()
        # A change the gateway is told about but cannot read: it keeps what it has.
        _, later = create_api_key(team_a, KeySettings("made while the database is away"))
        time.sleep(2)
        assert process.chat(clear, "llama")[0] == 200
        assert process.request("GET", "/healthz")[0] == 200
        assert process.request("GET", "/v1/models", key=later)[0] == 401
        assert "serving from cache" in process.output()
        proxy.restore()
        _wait_for_models(process, later, {"llama"})  # the next reload succeeds
    finally:
        process.stop()
        proxy.cut()


def test_when_every_replica_is_full_requests_queue_and_keys_take_turns(
    team_a: Team, host: Host, tmp_path: Path, gateway: GatewayProcess
) -> None:
    """The engine runs one request at a time (like vLLM at --max-num-seqs 1) and says how many
    wait; the gateway then holds new requests and lets them through one key at a time."""
    engine = Upstream("--tokens", "4", "--token-delay-ms", "150", "--max-num-seqs", "1")
    try:
        serve(team_a, host, tmp_path, "llama", engine.port, State.READY)
        busy = create_api_key(team_a, KeySettings("batch job"))[1]
        polite = create_api_key(team_a, KeySettings("notebook"))[1]
        _wait_for_models(gateway, polite, {"llama"})
        finished: dict[str, list[float]] = {"busy": [], "polite": []}
        started = time.monotonic()

        answers: list[tuple[int, bytes]] = []

        def ask(who: str, key: str) -> None:
            status, _, body = gateway.chat(key, "llama")
            answers.append((status, body))
            if status == 200:
                finished[who].append(time.monotonic() - started)

        first = [threading.Thread(target=ask, args=("busy", busy)) for _ in range(3)]
        for thread in first:
            thread.start()
        time.sleep(1.3)  # the gateway has read the engine's queue by now: every replica is full
        queued = [threading.Thread(target=ask, args=("busy", busy)) for _ in range(6)]
        for thread in queued:
            thread.start()
            time.sleep(0.02)
        time.sleep(0.1)
        late = threading.Thread(target=ask, args=("polite", polite))
        late.start()
        for thread in [*first, *queued, late]:
            thread.join(30)
    finally:
        engine.stop()
    assert [status for status, _ in answers] == [200] * 10, answers
    assert len(finished["polite"]) == 1
    # First come, first served would answer the notebook last; taking turns, it passes most
    # of the batch job's queued requests.
    behind = [t for t in finished["busy"] if t > finished["polite"][0]]
    assert len(behind) >= 3, finished
    connection = gateway.connection()
    connection.request("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    text = connection.getresponse().read().decode()
    connection.close()
    waited = [
        line
        for line in text.splitlines()
        if line.startswith("berth_gateway_queue_wait_seconds_count")
    ]
    assert waited
    assert float(waited[0].split()[-1]) >= 5
