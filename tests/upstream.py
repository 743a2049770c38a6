"""A fast local HTTP server that answers like vLLM's OpenAI-compatible server — NOT vLLM.

It generates nothing: a completion is ``--tokens`` (or ``max_tokens``) copies of one word,
streamed as vLLM streams them (``data: {chunk}`` events, the usage-only chunk when
``stream_options.include_usage`` is set, ``data: [DONE]``), with ``usage`` counted the way the
gateway reads it. It exists so the gateway's tests and benchmark have an upstream that costs
almost nothing per request (asyncio + httptools on uvloop, keep-alive, chunked streaming), and
can be killed mid-answer like a crashed engine. With ``--max-num-seqs N`` it runs N requests at
once and the rest wait, counted in ``/metrics`` as ``vllm:num_requests_waiting`` like vLLM's.
Run it on its own:

    python tests/upstream.py --port 0 --name llama --tokens 16 --token-delay-ms 5 [--api-key K]

It prints ``listening on 127.0.0.1:PORT`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httptools
import uvloop

WORD = "tok "


class Settings:
    def __init__(self, args: argparse.Namespace):
        self.name: str = args.name
        self.tokens: int = args.tokens
        self.delay_s: float = args.token_delay_ms / 1000
        self.api_key: str = args.api_key or ""
        # Like vLLM's --max-num-seqs: requests beyond it wait, and /metrics says how many.
        self.slots = asyncio.Semaphore(args.max_num_seqs) if args.max_num_seqs else None
        self.running = 0
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.slots is None:
            self.running += 1
            try:
                yield
            finally:
                self.running -= 1
            return
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self.slots.release()

    def metrics(self) -> bytes:
        label = f'{{engine="0",model_name="{self.name}"}}'
        return (
            f"vllm:num_requests_running{label} {float(self.running)}\n"
            f"vllm:num_requests_waiting{label} {float(self.waiting)}\n"
        ).encode()


class Exchange(asyncio.Protocol):
    """One client connection: parses requests with httptools, answers them in order."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.queue: asyncio.Queue[tuple[bytes, bytes, dict[bytes, bytes], bytes] | None] = (
            asyncio.Queue()
        )
        self.worker: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.worker = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", {}, []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        self.queue.put_nowait((method, self.url, self.headers, b"".join(self.body)))

    async def _serve(self) -> None:
        while True:
            request = await self.queue.get()
            if request is None or self.transport.is_closing():
                return
            await self._answer(*request)

    async def _answer(self, method: bytes, url: bytes, headers: dict, body: bytes) -> None:
        path = url.split(b"?", 1)[0]
        if path in (b"/health", b"/ping"):
            return self._send(200, b"", b"")
        if path == b"/metrics":
            return self._send(200, b"text/plain; version=0.0.4", self.settings.metrics())
        if self.settings.api_key and path.startswith(b"/v1/"):
            expected = f"Bearer {self.settings.api_key}".encode()
            if headers.get(b"authorization") != expected:
                return self._json(401, {"error": "Unauthorized"})
        if path == b"/v1/models" and method == b"GET":
            card = {"id": self.settings.name, "object": "model", "owned_by": "vllm"}
            return self._json(200, {"object": "list", "data": [card]})
        if method != b"POST" or path not in (
            b"/v1/chat/completions",
            b"/v1/completions",
            b"/v1/embeddings",
        ):
            return self._json(404, {"detail": "Not Found"})
        try:
            payload = json.loads(body)
        except ValueError:
            return self._json(400, {"error": {"message": "bad JSON", "type": "BadRequestError"}})
        prompt_tokens = max(1, len(body) // 4)
        if path == b"/v1/embeddings":
            usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
            data = [{"object": "embedding", "index": 0, "embedding": [0.0] * 8}]
            return self._json(
                200, {"object": "list", "data": data, "model": self.settings.name, "usage": usage}
            )
        count = int(payload.get("max_tokens") or self.settings.tokens)
        chat = path == b"/v1/chat/completions"
        async with self.settings.slot():
            if payload.get("stream"):
                return await self._stream(payload, chat, count, prompt_tokens)
            if self.settings.delay_s:  # generating takes as long as when streamed
                await asyncio.sleep(self.settings.delay_s * (count - 1))
            return self._json(200, _completion(self.settings.name, chat, count, prompt_tokens))

    async def _stream(self, payload: dict, chat: bool, count: int, prompt_tokens: int) -> None:
        head = (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        self.transport.write(head)
        base = {"id": "cmpl-upstream", "created": int(time.time()), "model": self.settings.name}
        kind = "chat.completion.chunk" if chat else "text_completion"
        for index in range(count):
            if self.transport.is_closing():
                return
            last = index == count - 1
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if last else None}
            if chat:
                choice["delta"] = (
                    {"content": WORD} if index else {"role": "assistant", "content": WORD}
                )
            else:
                choice["text"] = WORD
            self._chunk({**base, "object": kind, "choices": [choice]})
            if self.settings.delay_s and not last:
                await asyncio.sleep(self.settings.delay_s)
        options = payload.get("stream_options") or {}
        if options.get("include_usage"):
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": count,
                "total_tokens": prompt_tokens + count,
            }
            self._chunk({**base, "object": kind, "choices": [], "usage": usage})
        self._raw_chunk(b"data: [DONE]\n\n")
        self.transport.write(b"0\r\n\r\n")

    def _chunk(self, event: dict) -> None:
        self._raw_chunk(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")

    def _raw_chunk(self, data: bytes) -> None:
        self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _json(self, status: int, body: dict) -> None:
        self._send(status, b"application/json", json.dumps(body).encode())

    def _send(self, status: int, content_type: bytes, body: bytes) -> None:
        reason = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found"}
        lines = [b"HTTP/1.1 %d %s" % (status, reason.get(status, b"Error"))]
        if content_type:
            lines.append(b"content-type: " + content_type)
        lines.append(b"content-length: %d" % len(body))
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)


def _completion(name: str, chat: bool, count: int, prompt_tokens: int) -> dict:
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": count,
        "total_tokens": prompt_tokens + count,
    }
    text = WORD * count
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "length",
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": "length"}
        kind = "text_completion"
    return {
        "id": "cmpl-upstream",
        "object": kind,
        "created": int(time.time()),
        "model": name,
        "choices": [choice],
        "usage": usage,
    }


async def serve(args: argparse.Namespace) -> None:
    settings = Settings(args)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Exchange(settings), args.host, args.port, backlog=4096, reuse_address=True
    )
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"listening on {args.host}:{port}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="llama", help="served model name")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per completion")
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    parser.add_argument("--api-key", default="", help="require this bearer token, like vLLM")
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=0,
        help="requests run at once (0: no limit); the rest wait, counted in /metrics like vLLM's",
    )
    uvloop.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
