"""Pushing deployment changes to open pages: Redis pub/sub in, Server-Sent Events out.

Writers call :func:`deployments.changes.publish` after their transaction commits; the async
view subscribes, first sends the current state (pub/sub keeps nothing for late subscribers), then
one event per change, with a keepalive comment every ``KEEPALIVE_S`` so proxies keep the
connection open.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import redis.asyncio
from django.conf import settings

from deployments.changes import channel

KEEPALIVE_S = 15.0
# A stream ends after this long and the browser's EventSource reconnects (after RETRY_MS): the
# new request passes sign-in and the access check again, whatever happened meanwhile.
MAX_LIFETIME_S = 300.0
RETRY_MS = 3000
ENDED = "event: end\ndata: \n\n"


async def sse_events(
    deployment_pk: int,
    render: Callable[[], Awaitable[str]],
    allowed: Callable[[], Awaitable[bool]],
    personalise: Callable[[str], str] = str,
    *,
    also: Sequence[int] = (),
) -> AsyncIterator[str]:
    """``event: status`` with the freshly rendered status each time the deployment (or one of
    the deployments in ``also``: its further replicas, whose states the status shows) changes.
    A render is shared by the viewers of a change; ``personalise`` puts in what is this
    viewer's own (the CSRF token of the status's forms).

    Before every event (and keepalive) ``allowed()`` asks again whether the viewer's session
    still exists and still may see the deployment: after a sign-out or a team removal the
    stream sends ``event: end`` and closes, instead of pushing the panel and the log tail on.
    After :data:`MAX_LIFETIME_S` it closes with a ``retry:`` hint and the page reconnects."""
    client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
    pubsub = client.pubsub()
    started = time.monotonic()
    try:
        # Subscribe before rendering the current state, so no change falls in between.
        await pubsub.subscribe(*(channel(pk) for pk in (deployment_pk, *also)))
        yield _event(personalise(await render()), retry_ms=RETRY_MS)
        quiet_since = time.monotonic()
        while (left := MAX_LIFETIME_S - (time.monotonic() - started)) > 0:
            message = await pubsub.get_message(timeout=min(KEEPALIVE_S, left))
            changed = message is not None and message["type"] == "message"
            if not changed and time.monotonic() - quiet_since < KEEPALIVE_S:
                continue
            if not await allowed():
                yield ENDED
                return
            if changed:
                html = await _shared(deployment_pk, message["data"], render)
                yield _event(personalise(html))
            else:
                yield ": keepalive\n\n"
            quiet_since = time.monotonic()
        yield f"retry: {RETRY_MS}\n\n"
    finally:
        await pubsub.unsubscribe()
        await pubsub.aclose()
        await client.aclose()


_renders: dict[tuple[int, bytes], asyncio.Task] = {}
SHARE_S = 5.0  # how long a render answers late viewers of the same change


async def _shared(deployment_pk: int, change: bytes, render: Callable[[], Awaitable[str]]) -> str:
    """Render once per change for every viewer of the deployment in this process: each publish
    carries its own id, so all viewers of one change ask for the same key. The status partial
    holds nothing particular to a viewer (every one of them passed the same access check; the
    CSRF token of its forms is a placeholder that ``personalise`` fills per viewer)."""
    key = (deployment_pk, change)
    task = _renders.get(key)
    if task is None:
        task = asyncio.ensure_future(render())
        _renders[key] = task
        loop = asyncio.get_running_loop()
        task.add_done_callback(lambda _done: loop.call_later(SHARE_S, _renders.pop, key, None))
    return await asyncio.shield(task)


def _event(html: str, *, retry_ms: int | None = None) -> str:
    data = "\n".join(f"data: {line}" for line in html.splitlines() or [""])
    retry = f"retry: {retry_ms}\n" if retry_ms is not None else ""
    return f"event: status\n{data}\n{retry}\n"
