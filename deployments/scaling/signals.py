"""What the scaler reads: each ready replica's ``/metrics`` (vLLM's own figures) and the gateways'
demand for the model (held and queued requests, the last request's time), which each gateway
writes to Redis once a second::

    readings = read_replicas(rows)              # {pk: EngineReading}, from the engines
    demand = read_demand(team_id, name)         # Demand(queued, last_request_at), all gateways
    write_demand(redis, gateway_id, {(team_id, name): (queued, last_request_at)})  # a gateway
"""

from __future__ import annotations

import http.client
import re
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from core import naming
from core.queues import redis_connection
from deployments.runtime.engine_host import engine_address

READ_TIMEOUT_S = 2.0
# A gateway's entry older than this is a gateway that stopped: its figures no longer count.
DEMAND_TTL_S = 15
SERIES = {
    "waiting": "num_requests_waiting",
    "running": "num_requests_running",
    # vLLM 0.32's name; before 0.10 it was gpu_cache_usage_perc (also read, for older images).
    "kv_cache": "kv_cache_usage_perc",
    "kv_cache_legacy": "gpu_cache_usage_perc",
}
_PATTERNS = {
    key: re.compile(rb"^vllm:" + name.encode() + rb"(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M)
    for key, name in SERIES.items()
}


@dataclass(frozen=True)
class EngineReading:
    waiting: float
    running: float
    kv_cache: float | None  # 0-1, None when the engine does not report it


@dataclass(frozen=True)
class Demand:
    queued: int = 0
    last_request_at: float | None = None


def parse_metrics(text: bytes) -> EngineReading:
    """The figures of one engine's Prometheus text, summed over its series (engines, models)."""

    def total(key: str) -> float | None:
        values = _PATTERNS[key].findall(text)
        return sum(float(value) for value in values) if values else None

    kv = total("kv_cache")
    if kv is None:
        kv = total("kv_cache_legacy")
    return EngineReading(total("waiting") or 0.0, total("running") or 0.0, kv)


def read_engine(address: str, port: int, engine_key: str = "") -> EngineReading | None:
    """GET /metrics of one engine (None when it does not answer)."""
    connection = http.client.HTTPConnection(address, port, timeout=READ_TIMEOUT_S)
    headers = {"Authorization": f"Bearer {engine_key}"} if engine_key else {}
    try:
        connection.request("GET", "/metrics", headers=headers)
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    return parse_metrics(body) if response.status == 200 else None


def read_replicas(rows: Iterable[Any]) -> dict[int, EngineReading | None]:
    """The readings of these deployments' engines, read in parallel (by primary key)."""
    targets = [row for row in rows if row.host_port]
    if not targets:
        return {}

    def one(row: Any) -> tuple[int, EngineReading | None]:
        address = engine_address(row.host.docker_endpoint)
        return row.pk, read_engine(address.strip("[]"), row.host_port, row.engine_key)

    with ThreadPoolExecutor(max_workers=min(len(targets), 8)) as pool:
        return dict(pool.map(one, targets))


def demand_key(team_id: int, name: str) -> str:
    return naming.gateway_key(settings.BERTH_INSTANCE, "demand", team_id, name)


def write_demand(
    redis: Any, gateway_id: str, demand: Mapping[tuple[int, str], tuple[int, float | None]]
) -> list[Any]:
    """The Redis commands (on ``redis``, a client or a pipeline) that publish one gateway's
    demand per model: ``queued|last_request_at|written_at`` under the gateway's id."""
    now = time.time()
    commands = []
    for (team_id, name), (queued, last) in demand.items():
        key = demand_key(team_id, name)
        commands.append(redis.hset(key, gateway_id, f"{queued}|{last or ''}|{now}"))
        commands.append(redis.expire(key, DEMAND_TTL_S * 4))
    return commands


def read_demand(team_id: int, name: str, *, now: float | None = None) -> Demand:
    """The demand for one model summed over the gateways that wrote lately."""
    entries = redis_connection().hgetall(demand_key(team_id, name))
    return demand_of(entries.values(), now=time.time() if now is None else now)


def demand_of(values: Iterable[bytes | str], *, now: float) -> Demand:
    queued, last = 0, None
    for raw in values:
        text = raw.decode() if isinstance(raw, bytes) else raw
        try:
            count, last_at, written = text.split("|")
            written_at = float(written)
        except ValueError:
            continue
        if last_at:
            last = max(last or 0.0, float(last_at))
        if now - written_at <= DEMAND_TTL_S:
            queued += int(count)
    return Demand(queued, last)
