"""Which replica serves a request: least outstanding requests, with prefix affinity.

vLLM caches the KV blocks of prompts it has seen (automatic prefix caching), so requests that
share a beginning — a system prompt, a few-shot preamble — are cheaper on the replica that saw
it first. The prompt's leading characters pick a preferred replica by rendezvous hashing (adding
or removing a replica moves only its own share); the preferred replica keeps the request unless
it has ``AFFINITY_SLACK`` more requests in flight than the least busy one. A replica that failed
before answering is skipped for a cooldown that doubles with each failure in a row.

Counters are per gateway process: each process balances its own traffic, which is what least
outstanding requests measures.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.cache import Backend

AFFINITY_CHARS = 256
AFFINITY_SLACK = 4
COOLDOWN_FIRST_S = 2.0
COOLDOWN_MAX_S = 30.0


def affinity_text(payload: dict[str, Any]) -> str:
    """The prompt's first ``AFFINITY_CHARS`` characters ('' when there is no text prompt)."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
            if sum(map(len, parts)) >= AFFINITY_CHARS:
                break
        return "\n".join(parts)[:AFFINITY_CHARS]
    prompt = payload.get("prompt")
    return prompt[:AFFINITY_CHARS] if isinstance(prompt, str) else ""


def _score(affinity: str, backend: Backend) -> bytes:
    seed = f"{affinity}\0{backend.deployment_id}:{backend.replica}".encode()
    return hashlib.blake2b(seed, digest_size=8).digest()


@dataclass
class Balancer:
    """In-flight counts and cooldowns of this process's replicas."""

    outstanding: dict[tuple[int, int], int] = field(default_factory=dict)
    cooldown_until: dict[tuple[int, int], float] = field(default_factory=dict)
    failures: dict[tuple[int, int], int] = field(default_factory=dict)

    def choose(
        self,
        backends: Sequence[Backend],
        affinity: str,
        now: float,
        exclude: Iterable[tuple[int, int]] = (),
    ) -> Backend | None:
        """The replica for a request, or None when every one is excluded or cooling down."""
        skipped = set(exclude)
        usable = [
            b
            for b in backends
            if b.ident not in skipped and self.cooldown_until.get(b.ident, 0.0) <= now
        ]
        if not usable:
            return None
        if len(usable) == 1:
            return usable[0]
        least = min(usable, key=lambda b: self.outstanding.get(b.ident, 0))
        if not affinity:
            return least
        preferred = max(usable, key=lambda b: _score(affinity, b))
        busy = self.outstanding.get(preferred.ident, 0)
        if busy - self.outstanding.get(least.ident, 0) >= AFFINITY_SLACK:
            return least
        return preferred

    def acquire(self, backend: Backend) -> None:
        self.outstanding[backend.ident] = self.outstanding.get(backend.ident, 0) + 1

    def release(self, backend: Backend) -> None:
        left = self.outstanding.get(backend.ident, 1) - 1
        if left > 0:
            self.outstanding[backend.ident] = left
        else:
            self.outstanding.pop(backend.ident, None)

    def failed(self, backend: Backend, now: float) -> float:
        """Put ``backend`` in cooldown; returns the cooldown in seconds."""
        count = self.failures.get(backend.ident, 0) + 1
        self.failures[backend.ident] = count
        cooldown = min(COOLDOWN_FIRST_S * 2 ** (count - 1), COOLDOWN_MAX_S)
        self.cooldown_until[backend.ident] = now + cooldown
        return cooldown

    def succeeded(self, backend: Backend) -> None:
        if backend.ident in self.failures:
            self.failures.pop(backend.ident, None)
            self.cooldown_until.pop(backend.ident, None)
