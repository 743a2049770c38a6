"""A deployment with two replicas behind the real gateway process (``manage.py berth_gateway``):
requested through ``services.request_deployment(replicas=2)``, each replica's row answering on
its own vLLM-like upstream (``tests/upstream.py``, NOT vLLM; started with ``--name`` so an
answer says which replica gave it)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from accounts.keys import KeySettings, create_api_key
from accounts.models import Team, User
from core.queues import get_queue
from deployments.models import Deployment
from deployments.states import State
from gateway.models import UsageMinute
from gpus.models import Host
from tests.gateway_process import METRICS_TOKEN, GatewayProcess, Upstream, serve_replicas, walk

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

DEADLINE_S = 20


@pytest.fixture
def host(db: None) -> Iterator[Host]:
    """This machine as a host (engines on BERTH_ENGINE_BIND, the loopback); its queue, where
    the replicas' launch jobs wait unserved, is emptied afterwards."""
    host = Host.objects.create(name="local")
    yield host
    get_queue(host.queue_name).empty()


@pytest.fixture
def engines() -> Iterator[dict[str, Upstream]]:
    """Two upstreams, ``one`` and ``two``, streaming 40 tokens 50 ms apart (2 s an answer)."""
    started = {
        name: Upstream("--name", name, "--tokens", "40", "--token-delay-ms", "50")
        for name in ("one", "two")
    }
    yield started
    for engine in started.values():
        engine.stop()


@pytest.fixture
def key(team_a: Team) -> str:
    """An inference key of team A, without limits."""
    return create_api_key(team_a, KeySettings("replicas"))[1]


@pytest.fixture
def gateway(redis_client: Redis) -> Iterator[GatewayProcess]:
    """The gateway process, holding requests for loading models up to 8 s."""
    process = GatewayProcess(BERTH_GATEWAY_HOLD_S="8")
    yield process
    process.stop()


@pytest.fixture
def replicas(
    alice: User, team_a: Team, host: Host, engines: dict[str, Upstream], tmp_path: Path
) -> list[Deployment]:
    """Team A's ``llama`` with two replicas, replica 0 on upstream ``one``, 1 on ``two``
    (both still queued)."""
    rows = serve_replicas(alice, team_a, host, tmp_path, "llama", [engines["one"], engines["two"]])
    assert [(row.replica_index, row.state) for row in rows] == [
        (0, State.QUEUED),
        (1, State.QUEUED),
    ]
    return rows


def test_requests_spread_over_both_replicas_and_a_killed_one_is_routed_around(
    replicas: list[Deployment], engines: dict[str, Upstream], key: str, gateway: GatewayProcess
) -> None:
    for row in replicas:
        walk(row, State.READY)
    _wait_for_model(gateway, key)

    # Spread: prompts of their own pick replicas by their hash; both are used.
    served = Counter(_served_by(gateway, key, f"question {n}") for n in range(20))
    assert set(served) == {"one", "two"}, served
    assert min(served.values()) >= 3, served
    # Usage is recorded per replica: its own row and its index.
    _wait_until(
        lambda: (
            {(row.pk, row.replica_index) for row in replicas}
            <= set(UsageMinute.objects.values_list("deployment_id", "replica"))
        )
    )

    # Four streams in flight, two on each replica (least outstanding alternates), and two plain
    # requests; then replica "one" dies.
    streams = [_Stream(gateway, key) for _ in range(4)]
    for stream in streams:
        stream.start()
        stream.wait_for_first_event()
    plain: list[tuple[int, str]] = []
    askers = [
        threading.Thread(target=lambda: plain.append(_chat(gateway, key, "", max_tokens=30)))
        for _ in range(2)
    ]
    for asker in askers:
        asker.start()
    killed_at = time.monotonic()
    engines["one"].process.kill()
    for thread in [*streams, *askers]:
        thread.join(DEADLINE_S)
        assert not thread.is_alive(), "a request hung after its replica died"
    on_one = [s for s in streams if s.replica == "one"]
    on_two = [s for s in streams if s.replica == "two"]
    assert len(on_one) == len(on_two) == 2, [s.replica for s in streams]
    for stream in on_one:  # ended at once, with an error event, the connection closed cleanly
        assert stream.ended_at - killed_at < 3
        assert stream.error == "upstream_broken", stream.events[-3:]
        assert 1 <= stream.tokens < 40
    for stream in on_two:  # untouched
        assert (stream.tokens, stream.events[-1], stream.error) == (40, "[DONE]", None)
    # The plain requests had no answer byte yet: retried on the other replica.
    assert plain == [(200, "two"), (200, "two")], plain

    # Every later request is served by the other replica, streamed or not, through the
    # cooldowns of the dead one (each retried on "two" before a first byte).
    later = [_chat(gateway, key, f"after {n}", max_tokens=2) for n in range(40)]
    assert later == [(200, "two")] * 40, Counter(later)
    after = _Stream(gateway, key, prompt="one more")
    after.run()
    assert (after.replica, after.tokens, after.error) == ("two", 40, None)


def test_while_one_replica_loads_requests_go_to_the_ready_one(
    replicas: list[Deployment], key: str, gateway: GatewayProcess
) -> None:
    loading, ready = replicas
    walk(loading, State.LOADING)
    walk(ready, State.READY)
    _wait_for_model(gateway, key)
    answers = [_chat(gateway, key, f"question {n}", max_tokens=2) for n in range(20)]
    assert answers == [(200, "two")] * 20, Counter(answers)
    walk(loading, State.READY)  # published: the gateway reloads and uses both
    deadline = time.monotonic() + DEADLINE_S
    seen: set[str] = set()
    n = 0
    while seen != {"one", "two"}:
        assert time.monotonic() < deadline, seen
        seen.add(_served_by(gateway, key, f"again {n}"))
        n += 1


def test_while_every_replica_loads_a_request_is_held_and_answered_once_one_is_ready(
    replicas: list[Deployment], key: str, gateway: GatewayProcess
) -> None:
    for row in replicas:
        walk(row, State.LOADING)
    _wait_for_model(gateway, key)
    result: list[tuple[int, str]] = []
    asking = threading.Thread(target=lambda: result.append(_chat(gateway, key, "hi", 2)))
    started = time.monotonic()
    asking.start()
    _wait_until(lambda: _in_flight(gateway) == 1)  # arrived, and held: nothing answers it
    assert asking.is_alive()
    assert result == []
    walk(replicas[1], State.READY)
    asking.join(DEADLINE_S)
    assert result == [(200, "two")]
    assert time.monotonic() - started < 8  # answered on the change, not after the hold


# --- helpers ----------------------------------------------------------------------------------


def _chat(gateway: GatewayProcess, key: str, prompt: str, max_tokens: int) -> tuple[int, str]:
    """(status, the replica that answered — the upstream's name — or the error's code)."""
    messages = [{"role": "user", "content": prompt}] if prompt else []
    status, _, body = gateway.chat(key, "llama", messages=messages, max_tokens=max_tokens)
    answer = json.loads(body)
    return status, answer.get("model") or answer.get("error", {}).get("code", "")


def _served_by(gateway: GatewayProcess, key: str, prompt: str) -> str:
    status, replica = _chat(gateway, key, prompt, max_tokens=2)
    assert status == 200, replica
    return replica


class _Stream(threading.Thread):
    """One streamed chat completion read event by event: which replica, how many tokens, how
    it ended."""

    def __init__(self, gateway: GatewayProcess, key: str, prompt: str = ""):
        super().__init__(daemon=True)
        self.gateway, self.key, self.prompt = gateway, key, prompt
        self.events: list[str] = []
        self.replica = ""
        self.tokens = 0
        self.error: str | None = None
        self.ended_at = 0.0
        self.first = threading.Event()

    def run(self) -> None:
        messages = [{"role": "user", "content": self.prompt}] if self.prompt else []
        body = {"model": "llama", "stream": True, "messages": messages}
        connection = self.gateway.connection(timeout=DEADLINE_S)
        try:
            connection.request(
                "POST",
                "/v1/chat/completions",
                body=json.dumps(body).encode(),
                headers={"Authorization": f"Bearer {self.key}"},
            )
            response = connection.getresponse()
            assert response.status == 200
            while line := response.readline():
                if line.startswith(b"data: "):
                    self._event(line[6:].strip().decode())
        except http.client.IncompleteRead:
            self.error = "incomplete"  # not what the gateway does: it ends the chunked body
        finally:
            self.ended_at = time.monotonic()
            connection.close()
            self.first.set()

    def _event(self, data: str) -> None:
        self.events.append(data)
        if data != "[DONE]":
            chunk = json.loads(data)
            if "error" in chunk:
                self.error = chunk["error"]["code"]
            else:
                self.replica = chunk["model"]
                self.tokens += len(chunk["choices"])
        self.first.set()

    def wait_for_first_event(self) -> None:
        assert self.first.wait(DEADLINE_S), "the stream did not start"


def _wait_until(condition: Any) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, "not seen in time"
        time.sleep(0.05)


def _wait_for_model(gateway: GatewayProcess, key: str) -> None:
    def listed() -> bool:
        status, _, body = gateway.request("GET", "/v1/models", key=key)
        return status == 200 and [card["id"] for card in json.loads(body)["data"]] == ["llama"]

    _wait_until(listed)


def _in_flight(gateway: GatewayProcess) -> float:
    connection = gateway.connection()
    connection.request("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    text = connection.getresponse().read().decode()
    connection.close()
    for line in text.splitlines():
        if line.startswith("berth_gateway_requests_in_flight "):
            return float(line.split()[-1])
    return 0.0
