"""Waiting in the gateway when every replica of a model is full, with fair turns.

vLLM queues what it cannot schedule (past ``--max-num-seqs`` or its KV cache) and says so in
``vllm:num_requests_waiting`` on ``/metrics``. Each gateway reads that figure from the replicas
of the models it served in the last minute, once a second. When every ready replica of a model
has requests waiting, a new request waits in the gateway instead — where it is cheap, can be
given up on, and is ordered fairly — and is let through when a replica has room again (the next
reading) or when one of this gateway's requests to that model ends.

Turns go round the keys with waiting requests, one request each, so a key that sends a thousand
requests does not starve one that sends one. (A deployment is one team's, and only that team's
keys reach it, so the keys sharing a queue are one team's.) The queue is bounded in size
(``QUEUE_MAX``, then 503 ``queue_full``) and in time (``BERTH_GATEWAY_HOLD_S``, then 503
``model_overloaded``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

import aiohttp

from gateway.cache import Backend, Route

SATURATED_WAITING = 1.0  # an engine with requests in its own queue has no room
POLL_S = 1.0
READ_TIMEOUT_S = 1.0
QUEUE_MAX = 256  # requests waiting per model in one gateway
# Let through per replica with room, per reading. One: what is let through joins the engine's
# own first-come queue, where turns no longer hold; each request that ends lets one more in.
RELEASE_PER_REPLICA = 1
RECENT_S = 60.0  # a model's replicas are watched this long after its last request
WAITING_LINE = re.compile(rb"^vllm:num_requests_waiting(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M)


class QueueFull(Exception):
    """``QUEUE_MAX`` requests are waiting already."""


def waiting_requests(metrics_text: bytes) -> float:
    """The sum of ``vllm:num_requests_waiting`` over the engine's series (0 when absent)."""
    return sum(float(value) for value in WAITING_LINE.findall(metrics_text))


class EngineLoad:
    """The latest ``num_requests_waiting`` of each replica this gateway watches."""

    def __init__(self) -> None:
        self.waiting: dict[tuple[int, int], float] = {}

    def saturated(self, backends: Sequence[Backend]) -> bool:
        """Every ready replica has requests waiting (unknown counts as room)."""
        return bool(backends) and all(
            self.waiting.get(b.ident, 0.0) >= SATURATED_WAITING for b in backends
        )

    async def read(self, session: aiohttp.ClientSession, backends: Iterable[Backend]) -> None:
        results = await asyncio.gather(
            *(self._read_one(session, b) for b in backends), return_exceptions=True
        )
        for result in results:
            if isinstance(result, tuple):
                ident, waiting = result
                self.waiting[ident] = waiting

    async def _read_one(
        self, session: aiohttp.ClientSession, backend: Backend
    ) -> tuple[tuple[int, int], float]:
        timeout = aiohttp.ClientTimeout(total=READ_TIMEOUT_S)
        async with session.get(backend.url + "/metrics", timeout=timeout) as response:
            body = await response.read()
        return backend.ident, waiting_requests(body) if response.status == 200 else 0.0


class FairQueue:
    """Requests waiting for one model, let through one key at a time in turn."""

    def __init__(self) -> None:
        self.by_key: dict[str, deque[asyncio.Future[None]]] = {}
        self.turns: deque[str] = deque()
        self.size = 0

    def join(self, key: str) -> asyncio.Future[None]:
        if self.size >= QUEUE_MAX:
            raise QueueFull
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if key not in self.by_key:
            self.by_key[key] = deque()
            self.turns.append(key)
        self.by_key[key].append(ticket)
        self.size += 1
        return ticket

    def leave(self, key: str, ticket: asyncio.Future[None]) -> None:
        """A ticket given up on (timed out, client gone)."""
        waiting = self.by_key.get(key)
        if waiting is not None and ticket in waiting:
            waiting.remove(ticket)
            self.size -= 1
            if not waiting:
                del self.by_key[key]
                self.turns.remove(key)

    def release(self, count: int) -> int:
        """Let ``count`` requests through, taking turns between keys; returns how many."""
        released = 0
        while released < count and self.turns:
            key = self.turns.popleft()
            waiting = self.by_key[key]
            ticket = waiting.popleft()
            self.size -= 1
            if waiting:
                self.turns.append(key)
            else:
                del self.by_key[key]
            if not ticket.done():
                ticket.set_result(None)
                released += 1
        return released


class Admission:
    """The queues of one gateway process and the load of the replicas it watches."""

    def __init__(self) -> None:
        self.load = EngineLoad()
        self.queues: dict[tuple[int, str], FairQueue] = {}
        self.recent: dict[tuple[int, str], float] = {}

    async def wait_turn(
        self, name: tuple[int, str], key: str, ready: Sequence[Backend], hold_s: float
    ) -> float | None:
        """Return at once while a replica has room and nobody waits (None); else queue and
        return the seconds waited. Raises QueueFull, or TimeoutError after ``hold_s``."""
        self.recent[name] = time.monotonic()
        queue = self.queues.get(name)
        if not (queue and queue.size) and not self.load.saturated(ready):
            return None
        queue = self.queues.setdefault(name, FairQueue())
        ticket = queue.join(key)
        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(ticket), hold_s)
        except TimeoutError:
            queue.leave(key, ticket)
            raise
        return time.monotonic() - started

    def done(self, name: tuple[int, str]) -> None:
        """A request to ``name`` ended: its place at the engine is free for the next one."""
        queue = self.queues.get(name)
        if queue is not None and queue.size:
            queue.release(1)

    async def look(
        self, session: aiohttp.ClientSession, routes: Mapping[tuple[int, str], Route]
    ) -> None:
        """Read the waiting counts of recently used models' replicas; let queued requests
        through where a replica has room."""
        now = time.monotonic()
        for name in [n for n, seen in self.recent.items() if now - seen > RECENT_S]:
            del self.recent[name]
        watched = [route for name in self.recent if (route := routes.get(name)) is not None]
        backends = [backend for route in watched for backend in route.ready]
        if backends:
            await self.load.read(session, backends)
        for name, queue in list(self.queues.items()):
            route = routes.get(name)
            room = [
                b
                for b in (route.ready if route else ())
                if self.load.waiting.get(b.ident, 0.0) < SATURATED_WAITING
            ]
            queue.release(len(room) * RELEASE_PER_REPLICA)
            if not queue.size:
                del self.queues[name]
