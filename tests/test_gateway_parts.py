"""The gateway's parts on their own: the stream reader, replica choice, limits on a real Redis,
usage aggregation on the real database, and the cache's routing table."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from django.test import override_settings
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from accounts.models import Team
from deployments.states import State
from gateway import cache, limits
from gateway.cache import Backend, KeyEntry
from gateway.models import AppliedEntry, UsageMinute
from gateway.queueing import EngineLoad, FairQueue, waiting_requests
from gateway.routing import AFFINITY_SLACK, Balancer, affinity_text
from gateway.sse import StreamUsage
from gateway.usage import (
    GROUP,
    Consumer,
    UsageRecord,
    apply,
    prune,
    prune_applied,
    stream_name,
)
from gpus.models import Host
from tests.conftest import TEST_INSTANCE, TEST_REDIS_URL, run_coroutine
from tests.gateway_process import serve, walk


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


TOKEN = {"choices": [{"delta": {"content": "a"}}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


def test_the_usage_chunk_is_read_and_removed_when_the_client_did_not_ask() -> None:
    stream = _event(TOKEN) + _event(TOKEN) + _event(USAGE) + b"data: [DONE]\n\n"
    reader = StreamUsage(strip_usage_chunk=True)
    # Split at awkward places, as network reads do.
    out = b"".join(reader.feed(stream[i : i + 7]) for i in range(0, len(stream), 7))
    out += reader.flush()
    assert out == _event(TOKEN) + _event(TOKEN) + b"data: [DONE]\n\n"
    assert reader.usage == USAGE["usage"]


def test_the_usage_chunk_is_kept_when_the_client_asked() -> None:
    stream = _event(TOKEN) + _event(USAGE) + b"data: [DONE]\n\n"
    reader = StreamUsage(strip_usage_chunk=False)
    assert reader.feed(stream) + reader.flush() == stream
    assert reader.usage == USAGE["usage"]


def test_whole_events_are_forwarded_at_once_and_half_events_wait() -> None:
    reader = StreamUsage(strip_usage_chunk=True)
    first = _event(TOKEN)
    assert reader.feed(first + first[:5]) == first
    assert reader.feed(first[5:]) == first


def _backend(deployment_id: int, replica: int = 0) -> Backend:
    return Backend(deployment_id, replica, "m", State.READY, "http://127.0.0.1:1")


def test_least_outstanding_wins_without_a_prompt() -> None:
    a, b = _backend(1), _backend(2)
    balancer = Balancer()
    balancer.acquire(a)
    assert balancer.choose([a, b], "", time.time()) == b
    balancer.acquire(b)
    balancer.acquire(b)
    assert balancer.choose([a, b], "", time.time()) == a


def test_a_shared_prompt_prefix_sticks_to_one_replica_until_it_is_overloaded() -> None:
    backends = [_backend(i) for i in range(1, 5)]
    balancer = Balancer()
    prompt = affinity_text({"messages": [{"role": "system", "content": "You are terse." * 40}]})
    preferred = balancer.choose(backends, prompt, time.time())
    assert all(balancer.choose(backends, prompt, time.time()) == preferred for _ in range(10))
    for _ in range(AFFINITY_SLACK):
        balancer.acquire(preferred)
    assert balancer.choose(backends, prompt, time.time()) != preferred
    # Different prefixes spread over the replicas.
    chosen = {balancer.choose(backends, f"prompt {i}", time.time()).ident for i in range(40)}
    assert len(chosen) >= 3


def test_a_failed_replica_cools_down_longer_each_time_in_a_row() -> None:
    a, b = _backend(1), _backend(2)
    balancer = Balancer()
    now = time.time()
    first = balancer.failed(a, now)
    assert balancer.choose([a, b], "", now) == b
    assert balancer.choose([a], "", now) is None
    assert balancer.failed(a, now) == first * 2
    balancer.succeeded(a)
    assert balancer.choose([a], "", now) == a


def _key(**limits_: int | None) -> KeyEntry:
    return KeyEntry(
        prefix=f"{time.monotonic_ns() % 10**8:08d}",
        secret_hash="",
        team_id=time.monotonic_ns(),
        team_slug="t",
        scope="inference",
        model_names=frozenset(),
        expires_at=None,
        rpm=limits_.get("rpm"),
        tpm=limits_.get("tpm"),
        team_budget=limits_.get("budget"),
    )


def _limiter_run(coroutine_factory):  # type: ignore[no-untyped-def]
    async def run():  # type: ignore[no-untyped-def]
        client = AsyncRedis.from_url(TEST_REDIS_URL)
        try:
            return await coroutine_factory(limits.Limiter(client, TEST_INSTANCE))
        finally:
            await client.aclose()

    return run_coroutine(run())


@pytest.mark.redis
def test_rpm_counts_requests_in_the_last_sixty_seconds() -> None:
    key = _key(rpm=2)
    now = 1_800_000_000.0 + 30  # 30 s into a minute

    async def go(limiter: limits.Limiter):  # type: ignore[no-untyped-def]
        return [await limiter.reserve(key, 10, now) for _ in range(3)] + [
            await limiter.reserve(key, 10, now + 31),  # a new calendar minute, same window
            await limiter.reserve(key, 10, now + 61),
        ]

    results = _limiter_run(go)
    assert [r is not None for r, _ in results] == [True, True, False, False, True]
    assert results[2][1] == limits.Refusal(limits.RPM, 61)
    assert results[3][1] == limits.Refusal(limits.RPM, 30)


@pytest.mark.redis
def test_a_burst_straddling_a_minute_boundary_gets_no_more_than_the_rpm() -> None:
    """Calendar windows let ``rpm`` through at 12:00:59.9 and ``rpm`` more at 12:01:00.1."""
    key = _key(rpm=5)
    boundary = 1_800_000_000.0 - 1_800_000_000.0 % 60 + 60

    async def go(limiter: limits.Limiter):  # type: ignore[no-untyped-def]
        before = [await limiter.reserve(key, 1, boundary - 0.1) for _ in range(5)]
        after = [await limiter.reserve(key, 1, boundary + 0.1 + i * 10) for i in range(6)]
        return before, after

    before, after = _limiter_run(go)
    assert all(reservation is not None for reservation, _ in before)
    assert [reservation is not None for reservation, _ in after] == [False] * 6
    assert after[0][1].code == limits.RPM
    # The first five leave the window 60 s after they came (within the second they came in).
    assert 59 <= after[0][1].retry_after_s <= 61


@pytest.mark.redis
def test_tpm_is_a_sliding_window_too() -> None:
    key = _key(tpm=100)
    boundary = 1_800_000_000.0 - 1_800_000_000.0 % 60 + 60

    async def go(limiter: limits.Limiter):  # type: ignore[no-untyped-def]
        first, _ = await limiter.reserve(key, 90, boundary - 0.5)
        straddling = await limiter.reserve(key, 90, boundary + 0.5)
        await limiter.settle(first, 10)  # the engine used far less: the window has room again
        after_settling = await limiter.reserve(key, 90, boundary + 1)
        later = await limiter.reserve(key, 90, boundary + 62)
        return straddling, after_settling, later

    straddling, after_settling, later = _limiter_run(go)
    assert straddling[1].code == limits.TPM
    assert after_settling[0] is not None
    assert later[0] is not None


@pytest.mark.redis
def test_tpm_reserves_then_settles_on_real_usage() -> None:
    key = _key(tpm=100)
    now = 1_800_000_000.0

    async def go(limiter: limits.Limiter):  # type: ignore[no-untyped-def]
        first, _ = await limiter.reserve(key, 80, now)
        blocked = await limiter.reserve(key, 30, now)
        await limiter.settle(first, 20)  # the engine used far less than reserved
        after = await limiter.reserve(key, 30, now)
        too_large = await limiter.reserve(key, 101, now)
        return blocked, after, too_large

    blocked, after, too_large = _limiter_run(go)
    assert blocked[1].code == limits.TPM
    assert after[0] is not None
    assert too_large[1] == limits.Refusal(limits.TOO_LARGE, None)


@pytest.mark.redis
def test_the_team_budget_spans_the_month_and_retries_at_its_end() -> None:
    key = _key(budget=100)
    now = 1_800_000_000.0

    async def go(limiter: limits.Limiter):  # type: ignore[no-untyped-def]
        ok, _ = await limiter.reserve(key, 60, now)
        await limiter.settle(ok, 90)
        refused = await limiter.reserve(key, 20, now + 3600)
        used = await limiter.month_used(key.team_id, now)
        return refused, used

    refused, used = _limiter_run(go)
    assert refused[1].code == limits.BUDGET
    assert refused[1].retry_after_s == limits.seconds_to_next_month(now + 3600)
    assert used == 90


def test_seconds_to_next_month_crosses_the_year() -> None:
    december_31_noon = 1_798_718_400.0  # 2026-12-31 12:00 UTC
    assert limits.seconds_to_next_month(december_31_noon) == 12 * 3600


def _record(team: Team, at: float, completion: int = 5, status: int = 200) -> UsageRecord:
    return UsageRecord(at, team.pk, "1a2b3c4d", "llama", 7, 0, status, 10, completion, 50.0, 12.0)


@pytest.mark.django_db
def test_usage_adds_up_per_minute_across_batches(team_a: Team) -> None:
    minute = 1_800_000_000.0 - 1_800_000_000.0 % 60
    apply([_record(team_a, minute + 1), _record(team_a, minute + 59, status=502)])
    apply([_record(team_a, minute + 30, completion=7), _record(team_a, minute + 61)])
    rows = list(UsageMinute.objects.order_by("minute"))
    assert [(r.requests, r.errors, r.completion_tokens) for r in rows] == [(3, 1, 17), (1, 0, 5)]
    assert rows[0].prompt_tokens == 30
    assert rows[0].ttft_count == 3


@pytest.mark.django_db
def test_usage_older_than_the_retention_is_pruned(team_a: Team) -> None:
    now = time.time()
    apply([_record(team_a, now - 10 * 86400), _record(team_a, now)])
    with override_settings(BERTH_GATEWAY_USAGE_RETENTION_D=5):
        assert prune() == 1
    assert UsageMinute.objects.count() == 1


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_entries_a_dead_consumer_read_but_never_acknowledged_are_claimed(
    team_a: Team, redis_client: Redis
) -> None:
    stream = stream_name(TEST_INSTANCE)
    redis_client.delete(stream)
    redis_client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    redis_client.xadd(stream, _record(team_a, time.time()).fields())
    # A consumer reads the entry and dies before applying it (no XACK).
    assert redis_client.xreadgroup(GROUP, "dead-gateway", {stream: ">"}, count=10)
    survivor = Consumer(redis_client, TEST_INSTANCE)
    survivor.claim_idle_ms = 0
    assert survivor.step() == 1
    assert UsageMinute.objects.get().requests == 1
    assert redis_client.xpending(stream, GROUP)["pending"] == 0


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_batch_committed_but_never_acknowledged_is_counted_once(
    team_a: Team, redis_client: Redis
) -> None:
    stream = stream_name(TEST_INSTANCE)
    redis_client.delete(stream)
    redis_client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    for _ in range(3):
        redis_client.xadd(stream, _record(team_a, time.time()).fields())
    # A gateway's consumer reads the batch and commits it, and its process dies before XACK:
    # the entries stay pending under its name.
    crashed = Consumer(redis_client, TEST_INSTANCE)
    crashed.name = "crashed-gateway"
    batch = crashed.take()
    crashed.commit(batch)
    assert UsageMinute.objects.get().requests == 3
    assert redis_client.xpending(stream, GROUP)["pending"] == 3
    # Another gateway's consumer claims them once idle: they are acknowledged, not re-counted.
    survivor = Consumer(redis_client, TEST_INSTANCE)
    survivor.claim_idle_ms = 0
    assert survivor.step() == 3
    assert redis_client.xpending(stream, GROUP)["pending"] == 0
    assert UsageMinute.objects.get().requests == 3
    # A consumer that was only slow (not dead) committing the same batch late changes nothing.
    crashed.commit(batch)
    row = UsageMinute.objects.get()
    assert (row.requests, row.completion_tokens) == (3, 15)


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_applied_ids_are_forgotten_once_no_consumer_can_be_handed_them_again(
    team_a: Team, redis_client: Redis
) -> None:
    stream = stream_name(TEST_INSTANCE)
    redis_client.delete(stream)
    redis_client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    two_days_ago_ms = int((time.time() - 2 * 86400) * 1000)
    fields = _record(team_a, time.time()).fields()
    old = [redis_client.xadd(stream, fields, id=f"{two_days_ago_ms}-{n}") for n in (0, 1)]
    redis_client.xadd(stream, fields)
    consumer = Consumer(redis_client, TEST_INSTANCE)
    batch = consumer.take()
    consumer.commit(batch)
    consumer.ack([entry for entry in batch if entry[0] != old[0]])  # the oldest stays pending
    assert prune_applied(redis_client, TEST_INSTANCE) == 0
    consumer.ack(batch)
    assert prune_applied(redis_client, TEST_INSTANCE) == 2
    assert AppliedEntry.objects.count() == 1


def test_engines_are_reached_at_their_hosts_address(settings) -> None:  # type: ignore[no-untyped-def]
    settings.BERTH_ENGINE_BIND = "0.0.0.0"  # noqa: S104
    assert cache.engine_address("tcp://gpu-01:2376") == "gpu-01"
    assert cache.engine_address("ssh://admin@gpu-02") == "gpu-02"
    assert cache.engine_address("unix:///var/run/docker.sock") == "127.0.0.1"
    assert cache.engine_address("") == "127.0.0.1"
    settings.BERTH_ENGINE_BIND = "10.0.0.5"
    assert cache.engine_address("") == "10.0.0.5"


@pytest.mark.django_db(transaction=True)
def test_the_routing_table_names_ready_loading_and_failed_models(
    team_a: Team, tmp_path: Path
) -> None:
    host = Host.objects.create(name="gpu-01", docker_endpoint="tcp://gpu-01:2376")
    serve(team_a, host, tmp_path, "ready", 30001, State.READY)
    serve(team_a, host, tmp_path, "loading", 30002, State.LOADING)
    failed = serve(team_a, host, tmp_path, "failed", 30003, State.LOADING)
    walk(failed, State.FAILED)
    stopped = serve(team_a, host, tmp_path, "stopped", 30004, State.READY)
    stopped.transition(State.STOPPING)
    routes = cache.load().routes
    assert set(routes) == {(team_a.pk, "ready"), (team_a.pk, "loading"), (team_a.pk, "failed")}
    assert routes[(team_a.pk, "ready")].ready[0].url == "http://gpu-01:30001"
    assert routes[(team_a.pk, "loading")].waiting[0].state == State.LOADING
    assert routes[(team_a.pk, "failed")].backends[0].diagnosis[0][0] == "cuda-oom"


def test_an_engines_waiting_requests_are_read_from_its_metrics() -> None:
    text = (
        b"# HELP vllm:num_requests_waiting Number of requests waiting.\n"
        b'vllm:num_requests_running{engine="0",model_name="m"} 4.0\n'
        b'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n'
        b'vllm:num_requests_waiting{engine="1",model_name="m"} 2.0\n'
    )
    assert waiting_requests(text) == 5.0
    assert waiting_requests(b"vllm:num_requests_running 1.0\n") == 0.0


def test_the_queue_takes_turns_between_keys_and_is_bounded() -> None:
    async def go() -> list[str]:
        queue = FairQueue()
        order: list[str] = []
        tickets = [(key, queue.join(key)) for key in ["busy"] * 5 + ["polite", "other"]]
        for key, ticket in tickets:
            ticket.add_done_callback(lambda _t, key=key: order.append(key))
        queue.release(4)
        await asyncio.sleep(0)
        gone = tickets[3][1]
        queue.leave("busy", gone)
        assert queue.size == 2
        return order

    assert run_coroutine(go()) == ["busy", "polite", "other", "busy"]


def test_a_model_is_saturated_only_when_every_ready_replica_has_a_queue() -> None:
    a, b = _backend(1), _backend(2)
    load = EngineLoad()
    load.waiting = {a.ident: 3.0}
    assert not load.saturated([a, b])  # b unknown: room
    load.waiting[b.ident] = 1.0
    assert load.saturated([a, b])
    assert not load.saturated([])
