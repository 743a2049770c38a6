"""Talking to an engine: open the request, then relay its answer to the client as it comes.

Nothing here buffers a stream: each engine read is forwarded as soon as it holds whole events
(``gateway.sse``). Failures are split by when they happen, because that decides what the
gateway may still do: before the engine answered (:class:`UpstreamUnavailable`) another replica
can take the request; after the client got its first byte the gateway can only end the answer
cleanly — an error event for a stream, a 502 for a plain answer not yet sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.cache import Backend
from gateway.sse import StreamUsage

Send = Callable[[dict[str, Any]], Awaitable[None]]
Header = tuple[bytes, bytes]
JSON = b"application/json"


class UpstreamUnavailable(Exception):
    """The engine could not be reached or broke off before answering: nothing was sent to the
    client. ``refused`` when nothing listened at all (a stopped or loading engine)."""

    def __init__(self, message: str, *, refused: bool):
        super().__init__(message)
        self.refused = refused


@dataclass
class Exchange:
    """What happened upstream: for the usage record and the metrics."""

    status: int = 0
    usage: dict[str, Any] | None = None
    first_byte_at: float | None = None  # perf_counter() of the engine's first answer byte
    broken: bool = False  # the engine broke off mid-answer
    client_gone: bool = False


async def open_request(
    session: aiohttp.ClientSession, backend: Backend, path: str, body: bytes
) -> aiohttp.ClientResponse:
    """POST to the engine and wait for its status line and headers."""
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if backend.engine_key:
        headers["Authorization"] = f"Bearer {backend.engine_key}"
    try:
        return await session.post(backend.url + path, data=body, headers=headers)
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamUnavailable(f"cannot connect: {exc.os_error}", refused=True) from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UpstreamUnavailable(f"{type(exc).__name__}: {exc}", refused=False) from None


def is_event_stream(response: aiohttp.ClientResponse) -> bool:
    return response.content_type == "text/event-stream"


async def relay_json(
    response: aiohttp.ClientResponse, send: Send, headers: Sequence[Header]
) -> Exchange:
    """A whole answer: read it, take its usage, send it with its length."""
    exchange = Exchange(status=response.status)
    try:
        body = await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        exchange.broken = True
        exchange.status = 502
        error = _error_body(f"the engine broke off its answer: {type(exc).__name__}")
        await _send_whole(send, 502, JSON, error, headers)
        return exchange
    exchange.first_byte_at = time.perf_counter()
    if response.status == 200:
        exchange.usage = usage_of(body)
    content_type = response.headers.get("Content-Type", "application/json").encode("latin-1")
    await _send_whole(send, response.status, content_type, body, headers)
    return exchange


async def relay_stream(
    response: aiohttp.ClientResponse,
    send: Send,
    headers: Sequence[Header],
    strip_usage_chunk: bool,
    client_gone: asyncio.Event,
) -> Exchange:
    """Server-sent events, forwarded event by event as they arrive."""
    exchange = Exchange(status=response.status)
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),  # nginx: do not buffer this response
                *headers,
            ],
        }
    )
    parser = StreamUsage(strip_usage_chunk)
    try:
        async for chunk in response.content.iter_any():
            if exchange.first_byte_at is None:
                exchange.first_byte_at = time.perf_counter()
            out = parser.feed(chunk)
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
            if client_gone.is_set():
                exchange.client_gone = True
                break
        else:
            rest = parser.flush()
            if rest:
                await send({"type": "http.response.body", "body": rest, "more_body": True})
    except (aiohttp.ClientError, TimeoutError) as exc:
        exchange.broken = True
        message = f"the engine broke off the stream: {type(exc).__name__}"
        event = b"data: " + _error_body(message) + b"\n\n"
        await send({"type": "http.response.body", "body": event, "more_body": True})
    exchange.usage = parser.usage
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return exchange


def usage_of(body: bytes) -> dict[str, Any] | None:
    if b'"usage"' not in body:
        return None
    try:
        usage = json.loads(body).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


def _error_body(message: str) -> bytes:
    error = {"message": message, "type": "upstream_error", "param": None, "code": "upstream_broken"}
    return json.dumps({"error": error}).encode()


async def _send_whole(
    send: Send, status: int, content_type: bytes, body: bytes, headers: Sequence[Header]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def watch_disconnect(receive: Callable[[], Awaitable[dict[str, Any]]], gone: asyncio.Event):
    """Set ``gone`` when the client disconnects (so a stream stops pulling from the engine)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return
