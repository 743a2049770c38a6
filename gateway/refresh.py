"""Keeping a gateway's cache current: Redis pub/sub pushes, a periodic reload, and the
database writes a gateway makes (audits of refused keys), all off the hot path.

A key change (``accounts.keys.keys_channel``) or a deployment change (the deployments' status
channels, by pattern) wakes the reloader, which reads a fresh snapshot in a thread and swaps it
in whole; pushes arriving meanwhile are folded into one more reload. Without pushes the cache
is reloaded every ``RELOAD_EVERY_S``. A reload that fails (database down) keeps the previous
snapshot in service and is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

from django.db import close_old_connections, connection
from redis.asyncio import Redis
from redis.exceptions import RedisError

from accounts import keys
from accounts.models import Team
from core import naming
from gateway import cache

logger = logging.getLogger(__name__)

RELOAD_EVERY_S = 30.0
RETRY_AFTER_FAILURE_S = 1.0
# Refused keys are audited at most once a minute per (prefix, reason) across gateways, and at
# most DENIAL_AUDITS_PER_MINUTE per process: a flood of bad keys must not flood the trail.
DENIAL_AUDIT_WINDOW_S = 60
DENIAL_AUDITS_PER_MINUTE = 30


def _load_in_thread() -> cache.Snapshot:
    close_old_connections()
    try:
        return cache.load()
    finally:
        connection.close()


class Refresher:
    """Holds the current snapshot and the event that fires when it is replaced."""

    def __init__(
        self, redis: Redis, instance: str, loader: Callable[[], cache.Snapshot] = _load_in_thread
    ):
        self.redis = redis
        self.instance = instance
        self.loader = loader
        self.snapshot = cache.Snapshot()
        self.loaded = False
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._denials: deque[float] = deque()

    def changed(self) -> asyncio.Event:
        """Set when the snapshot after the current one is in place."""
        return self._changed

    async def start(self) -> None:
        await self.reload()
        self._tasks = [
            asyncio.create_task(self._reload_loop(), name="gateway-reload"),
            asyncio.create_task(self._listen(), name="gateway-listen"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def reload(self) -> bool:
        try:
            snapshot = await asyncio.to_thread(self.loader)
        except Exception as exc:  # the database's errors vary by backend; keep serving
            logger.warning("gateway: cannot read keys and routes (%s); serving from cache", exc)
            return False
        self.snapshot, self.loaded = snapshot, True
        previous, self._changed = self._changed, asyncio.Event()
        previous.set()
        return True

    def wake(self) -> None:
        self._wake.set()

    async def _reload_loop(self) -> None:
        ok = True
        while True:
            wait_s = RELOAD_EVERY_S if ok else RETRY_AFTER_FAILURE_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait_s)
            self._wake.clear()
            ok = await self.reload()

    async def _listen(self) -> None:
        pattern = naming.deployment_channel_pattern(self.instance)
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(keys.keys_channel())
                await pubsub.psubscribe(pattern)
                self.wake()  # anything published while we were not listening
                async for message in pubsub.listen():
                    if message["type"] in ("message", "pmessage"):
                        self.wake()
            except (RedisError, OSError) as exc:
                logger.warning("gateway: pub/sub lost (%s); reconnecting", exc)
                await asyncio.sleep(RETRY_AFTER_FAILURE_S)
            finally:
                await pubsub.aclose()

    async def audit_denial(self, prefix: str | None, reason: str, team_id: int | None) -> None:
        """Audit a refused key (throttled); never raises."""
        now = time.monotonic()
        while self._denials and now - self._denials[0] > DENIAL_AUDIT_WINDOW_S:
            self._denials.popleft()
        if len(self._denials) >= DENIAL_AUDITS_PER_MINUTE:
            return
        try:
            marker = naming.gateway_key(self.instance, "denied", prefix or "-", reason)
            if not await self.redis.set(marker, 1, nx=True, ex=DENIAL_AUDIT_WINDOW_S):
                return
            self._denials.append(now)
            await asyncio.to_thread(_record_denied_in_thread, prefix, reason, team_id)
        except Exception as exc:
            logger.warning("gateway: could not audit a refused key: %s", exc)


def _record_denied_in_thread(prefix: str | None, reason: str, team_id: int | None) -> None:
    try:
        team = Team.objects.filter(pk=team_id).first() if team_id else None
        keys.record_denied(prefix, reason, team=team)
    finally:
        connection.close()
