"""The gateway: a small ASGI application in front of the engines (``manage.py berth_gateway``).

Per request, in memory: the key (prefix lookup, SHA-256, constant-time compare), the model
(the key's team and list), then one Redis round trip for the limits, a replica chosen by
``gateway.routing``, and the request sent on a pooled keep-alive connection. The answer is
relayed as it comes; the usage record and the settling of the reservation go to Redis after
the client has its last byte. The database is read only by the refresher, in a thread.

``x-berth-overhead-ms`` on every proxied answer is the gateway's own time from the request's
arrival until it is handed to the engine (for streams it travels with the headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from django.conf import settings
from django.db import connection
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError

from accounts.keys import parse_key, secret_matches
from accounts.models import KeyScope
from deployments.scaling.actions import wake_on_request
from deployments.scaling.signals import write_demand
from deployments.states import State
from gateway import errors, limits, queueing, upstream
from gateway.cache import KeyEntry, Route
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics, authorized
from gateway.refresh import Refresher
from gateway.routing import Balancer, affinity_text
from gateway.usage import STREAM_MAXLEN, Consumer, UsageRecord, stream_name

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

PROXIED = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
MAX_BODY = 32 * 1024 * 1024
# Engines close idle connections after 5 s (uvicorn's keep-alive default, which vLLM keeps):
# the pool lets its own go sooner, so it never sends on a connection the engine is closing.
POOL_KEEPALIVE_S = 4.0
CONNECT_TIMEOUT_S = 5.0
WAIT_POLL_S = 0.5
WAKE_RETRY_S = 5.0  # a wake that did not take (the deployment still idle) is tried again
DEMAND_RECENT_S = 300.0  # a model's last request is published this long


@dataclass(frozen=True)
class GatewayConfig:
    redis_url: str
    instance: str
    hold_s: float
    upstream_timeout_s: float
    metrics_token: str
    run_consumer: bool = True

    @classmethod
    def from_settings(cls) -> GatewayConfig:
        return cls(
            redis_url=settings.REDIS_URL,
            instance=settings.BERTH_INSTANCE,
            hold_s=float(settings.BERTH_GATEWAY_HOLD_S),
            upstream_timeout_s=float(settings.BERTH_GATEWAY_UPSTREAM_TIMEOUT_S),
            metrics_token=settings.BERTH_METRICS_TOKEN,
        )


@dataclass
class Call:
    """One proxied request as it goes through the gateway."""

    key: KeyEntry
    model: str
    path: str
    body: bytes
    stream: bool
    strip_usage: bool
    affinity: str
    reserve_tokens: int  # what the limits hold until the engine reports its usage
    started: float  # perf_counter() at arrival
    arrived_at: float  # Unix time at arrival


class Gateway:
    """The ASGI application. One per process; its lifespan opens and closes the pools."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.metrics = GatewayMetrics()
        self.balancer = Balancer()
        self.stream_key = stream_name(config.instance)
        self._background: set[asyncio.Task] = set()
        self._pending_writes: list[tuple[limits.Reservation | None, int, UsageRecord | None]] = []
        self.admission = queueing.Admission()
        self.demand = Demand()
        self._waking: dict[int, float] = {}  # deployment id -> monotonic time of the last try

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    # --- lifespan ---------------------------------------------------------------------------

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    logger.exception("gateway: start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0, keepalive_timeout=POOL_KEEPALIVE_S, ttl_dns_cache=60
        )
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=self.config.upstream_timeout_s
        )
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, cookie_jar=None
        )
        self.redis = Redis.from_url(self.config.redis_url)
        self.limiter = limits.Limiter(self.redis, self.config.instance)
        self.refresher = Refresher(self.redis, self.config.instance)
        await self.refresher.start()
        self._watcher = asyncio.create_task(self._watch_load(), name="gateway-load")
        self.consumer = None
        if self.config.run_consumer:
            self.consumer = Consumer(
                SyncRedis.from_url(self.config.redis_url), self.config.instance
            )
            self.consumer.start()
        logger.info(
            "gateway ready: %d keys, %d routes",
            len(self.refresher.snapshot.keys),
            len(self.refresher.snapshot.routes),
        )

    async def shutdown(self) -> None:
        self._watcher.cancel()
        await asyncio.gather(self._watcher, *self._background, return_exceptions=True)
        await self.refresher.stop()
        if self.consumer is not None:
            await asyncio.to_thread(self.consumer.stop)
        await self.session.close()
        await self.redis.aclose()

    # --- routing of URLs --------------------------------------------------------------------

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        try:
            if path in PROXIED:
                if method != "POST":
                    raise errors.method_not_allowed()
                await self.proxy(scope, receive, send)
            elif path == "/v1/models":
                await self.list_models(scope, send)
            elif path == "/metrics":
                await self.serve_metrics(scope, send)
            elif path in ("/healthz", "/health"):
                await self.healthz(send)
            else:
                raise errors.not_found_route()
        except GatewayError as error:
            self.metrics.errors.labels(error.code or error.type).inc()
            await _send_json(send, error.status, error.body(), error.headers)

    async def list_models(self, scope: Scope, send: Send) -> None:
        key = await self.authenticate(scope)
        snapshot = self.refresher.snapshot
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": key.team_slug}
            for name in snapshot.models_of(key)
        ]
        await _send_json(send, 200, json.dumps({"object": "list", "data": data}).encode())

    async def serve_metrics(self, scope: Scope, send: Send) -> None:
        if not authorized(_header(scope, b"authorization"), self.config.metrics_token):
            raise GatewayError(403, "invalid_request_error", "Send the metrics bearer token.")
        self.metrics.cache_age.set(time.time() - self.refresher.snapshot.loaded_at)
        body, content_type = self.metrics.render()
        await _send_json(send, 200, body, content_type=content_type.encode())

    async def healthz(self, send: Send) -> None:
        status = 200 if self.refresher.loaded else 503
        age = round(time.time() - self.refresher.snapshot.loaded_at, 1)
        body = {"status": "ok" if status == 200 else "starting", "cache_age_s": age}
        await _send_json(send, status, json.dumps(body).encode())

    # --- the hot path -----------------------------------------------------------------------

    async def authenticate(self, scope: Scope) -> KeyEntry:
        raw = _header(scope, b"authorization")
        if not raw.startswith(b"Bearer "):
            raise errors.invalid_key("Send your Berth key as 'Authorization: Bearer bk_...'.")
        presented = raw[7:].strip().decode("latin-1")
        prefix = parse_key(presented)
        if prefix is None:
            self._audit_denial(None, "malformed key", None)
            raise errors.invalid_key()
        entry = self.refresher.snapshot.keys.get(prefix)
        if entry is None or not secret_matches(presented, entry.secret_hash):
            self._audit_denial(prefix, "unknown or revoked key", None)
            raise errors.invalid_key()
        if entry.expires_at is not None and entry.expires_at <= time.time():
            self._audit_denial(prefix, "expired", entry.team_id)
            raise errors.invalid_key("This API key has expired.")
        if entry.scope != KeyScope.INFERENCE:
            self._audit_denial(prefix, f"scope {entry.scope} used on the gateway", entry.team_id)
            raise GatewayError(
                403,
                "invalid_request_error",
                "This key's scope is 'manage'; the gateway takes 'inference' keys.",
                code="wrong_scope",
            )
        return entry

    async def proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        started, arrived_at = time.perf_counter(), time.time()
        key = await self.authenticate(scope)
        body = await _read_body(receive)
        call = _parse_call(key, scope["path"], body, started, arrived_at)
        if not key.may_use(call.model):
            raise errors.model_not_found(call.model)
        self.demand.arrived((key.team_id, call.model), arrived_at)
        reservation = await self._reserve(call)
        self.metrics.in_flight.inc()
        exchange, backend = upstream.Exchange(status=0), None
        try:
            exchange, backend = await self._forward(call, receive, send)
        except GatewayError as error:
            exchange.status = error.status
            raise
        finally:
            self.metrics.in_flight.dec()
            self._finish(call, reservation, exchange, backend)
            self.admission.done((key.team_id, call.model))

    async def _reserve(self, call: Call) -> limits.Reservation | None:
        key = call.key
        try:
            reservation, refusal = await self.limiter.reserve(
                key, call.reserve_tokens, call.arrived_at
            )
        except RedisError as exc:
            if key.rpm or key.tpm or key.team_budget:
                raise GatewayError(
                    503,
                    "service_unavailable",
                    "Limits cannot be checked right now; retry shortly.",
                    code="limits_unavailable",
                ) from exc
            logger.warning("gateway: Redis unavailable for counters: %s", exc)
            return None
        if refusal is None:
            return reservation
        if refusal.code == limits.RPM:
            raise errors.rate_limited("requests", refusal.retry_after_s)
        if refusal.code == limits.TPM:
            raise errors.rate_limited("tokens", refusal.retry_after_s)
        if refusal.code == limits.TOO_LARGE:
            raise errors.request_too_large(key.tpm or 0)
        raise errors.budget_exhausted(refusal.retry_after_s or 1)

    async def _route(self, call: Call, tried: set[tuple[int, int]]) -> Route:
        """The model's route once a replica can take the request. While replicas are still
        loading, or the deployment is idle and being woken by this request, the request is held
        (up to ``BERTH_GATEWAY_HOLD_S``; later requests wait behind it); a model with no replica
        loading and none usable (failed, or all cooling down after errors), or an idle one that
        cannot be woken (quota, GPUs, host memory), is answered 503 ``model_not_ready`` at once."""
        deadline = time.monotonic() + self.config.hold_s
        waited_from, saw_idle = None, False
        name = (call.key.team_id, call.model)
        try:
            while True:
                route = self.refresher.snapshot.routes.get(name)
                if route is None:
                    raise errors.model_not_found(call.model)
                now = time.monotonic()
                if self.balancer.choose(route.ready, "", time.time(), tried) is not None:
                    if waited_from is not None:
                        self.metrics.queue_wait.observe(now - waited_from)
                        if saw_idle:
                            self.metrics.wake_wait.observe(now - waited_from)
                    return route
                if route.idle and not route.ready:
                    saw_idle = True
                    refusal = await self._wake(call, route)
                    if refusal:
                        raise _not_ready(call.model, route, f"cannot wake: {refusal}")
                if not route.waiting or now >= deadline:
                    raise _not_ready(call.model, route)
                if waited_from is None:
                    waited_from = now
                    self.demand.hold(name, 1)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self.refresher.changed().wait(), min(WAIT_POLL_S, deadline - now)
                    )
        finally:
            if waited_from is not None:
                self.demand.hold(name, -1)

    async def _wake(self, call: Call, route: Route) -> str:
        """Wake the idle deployment (once per ``WAKE_RETRY_S`` per gateway; the database's
        conditional update makes the first of several gateways win): '' when it is waking,
        else why it cannot be woken."""
        backend = route.idle[0]
        last = self._waking.get(backend.deployment_id)
        if last is not None and time.monotonic() - last < WAKE_RETRY_S:
            return ""
        self._waking[backend.deployment_id] = time.monotonic()
        detail = f"a request for {call.model} at the gateway (key {call.key.prefix})"
        try:
            refusal = await asyncio.to_thread(_wake_in_thread, backend.deployment_id, detail)
        except Exception:
            logger.exception("gateway: waking %s failed", call.model)
            return ""
        if refusal:
            self._waking.pop(backend.deployment_id, None)
        else:
            self.refresher.wake()  # read the woken deployment's new state at once
        return refusal

    async def _forward(
        self, call: Call, receive: Receive, send: Send
    ) -> tuple[upstream.Exchange, Any]:
        """Send to a replica, trying others while none has answered; relay the answer."""
        tried: set[tuple[int, int]] = set()
        retried_same: set[tuple[int, int]] = set()
        while True:
            route = await self._route(call, tried)
            if not tried and not retried_same:
                await self._wait_turn(call, route)
            backend = self.balancer.choose(route.ready, call.affinity, time.time(), tried)
            if backend is None:  # the snapshot changed between the two looks
                continue
            overhead_ms = (time.perf_counter() - call.started) * 1000
            self.balancer.acquire(backend)
            try:
                response = await upstream.open_request(self.session, backend, call.path, call.body)
            except upstream.UpstreamUnavailable as exc:
                self.balancer.release(backend)
                # A reset on a pooled connection is usually the connection, not the engine:
                # one more try on the same replica before it goes into cooldown.
                if not exc.refused and backend.ident not in retried_same:
                    retried_same.add(backend.ident)
                    continue
                cooldown = self.balancer.failed(backend, time.time())
                logger.warning(
                    "gateway: replica %s of %s failed (%s); cooldown %.0f s",
                    backend.ident,
                    call.model,
                    exc,
                    cooldown,
                )
                tried.add(backend.ident)
                continue
            try:
                return await self._relay(call, response, overhead_ms, receive, send), backend
            finally:
                response.release()
                self.balancer.release(backend)

    async def _wait_turn(self, call: Call, route: Route) -> None:
        """Queue in the gateway while every replica is full (``gateway.queueing``); a request
        also queues behind others already waiting, so nobody jumps the line."""
        name = (call.key.team_id, call.model)
        try:
            waited = await self.admission.wait_turn(
                name, call.key.prefix, route.ready, self.config.hold_s
            )
        except queueing.QueueFull:
            raise errors.overloaded(call.model, "queue_full", route.blocked) from None
        except TimeoutError:
            raise errors.overloaded(call.model, "model_overloaded", route.blocked) from None
        if waited is not None:
            self.metrics.queue_wait.observe(waited)

    async def _watch_load(self) -> None:
        while True:
            await asyncio.sleep(queueing.POLL_S)
            try:
                await self.admission.look(self.session, self.refresher.snapshot.routes)
            except Exception:
                logger.exception("gateway: reading the engines' load failed")
            try:
                await self._publish_demand()
            except RedisError as exc:
                logger.warning("gateway: could not publish the demand for the scaler: %s", exc)

    async def _publish_demand(self) -> None:
        """Tell the scalers what waits here and when each model was last asked for (what the
        engines cannot see: requests held for an idle or loading model, or queued here)."""
        queued = {name: queue.size for name, queue in self.admission.queues.items()}
        figures = self.demand.figures(queued)
        if not figures:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            write_demand(pipe, self.demand.gateway_id, figures)
            await pipe.execute()

    async def _relay(
        self,
        call: Call,
        response: aiohttp.ClientResponse,
        overhead_ms: float,
        receive: Receive,
        send: Send,
    ) -> upstream.Exchange:
        self.metrics.overhead.observe(overhead_ms / 1000)
        headers = [(b"x-berth-overhead-ms", f"{overhead_ms:.2f}".encode())]
        if not (call.stream and upstream.is_event_stream(response)):
            return await upstream.relay_json(response, send, headers)
        gone = asyncio.Event()
        watcher = asyncio.create_task(upstream.watch_disconnect(receive, gone))
        try:
            return await upstream.relay_stream(response, send, headers, call.strip_usage, gone)
        finally:
            watcher.cancel()

    # --- after the answer -------------------------------------------------------------------

    def _finish(
        self,
        call: Call,
        reservation: limits.Reservation | None,
        exchange: upstream.Exchange,
        backend: Any,
    ) -> None:
        usage = exchange.usage or {}
        prompt = _count(usage.get("prompt_tokens"))
        completion = _count(usage.get("completion_tokens"))
        ttft_ms = None
        if call.stream and exchange.first_byte_at is not None:
            ttft_ms = (exchange.first_byte_at - call.started) * 1000
            self.metrics.ttft.labels(call.model).observe(ttft_ms / 1000)
        status = 502 if exchange.broken else exchange.status
        self.metrics.requests.labels(call.model, str(status)).inc()
        if prompt:
            self.metrics.tokens.labels(call.model, "prompt").inc(prompt)
        if completion:
            self.metrics.tokens.labels(call.model, "completion").inc(completion)
        if exchange.broken:
            self.metrics.errors.labels("upstream_broken").inc()
            if backend is not None:
                self.balancer.failed(backend, time.time())
        elif backend is not None:
            self.balancer.succeeded(backend)
        record = None
        if backend is not None:
            record = UsageRecord(
                at=call.arrived_at,
                team_id=call.key.team_id,
                key_prefix=call.key.prefix,
                model=call.model,
                deployment_id=backend.deployment_id,
                replica=backend.replica,
                status=status,
                prompt_tokens=prompt,
                completion_tokens=completion,
                latency_ms=(time.perf_counter() - call.started) * 1000,
                ttft_ms=ttft_ms,
            )
        self._pending_writes.append((reservation, prompt + completion, record))
        if len(self._pending_writes) == 1:  # the first since the last flush schedules one
            task = asyncio.create_task(self._write_after())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _write_after(self) -> None:
        """Settle the reservations and append the usage records of every request that ended
        since the last flush: one pipeline, one Redis round trip for all of them (the flush
        runs at the loop's next turn, so nothing waits on a timer)."""
        writes, self._pending_writes = self._pending_writes, []
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for reservation, used, record in writes:
                    if reservation is not None:
                        limits.settle_into(pipe, reservation, used)
                    if record is not None:
                        pipe.xadd(
                            self.stream_key, record.fields(), maxlen=STREAM_MAXLEN, approximate=True
                        )
                await pipe.execute()
        except RedisError as exc:
            self.metrics.errors.labels("usage_lost").inc(len(writes))
            logger.error("gateway: usage of %d requests could not be written: %s", len(writes), exc)

    def _audit_denial(self, prefix: str | None, reason: str, team_id: int | None) -> None:
        task = asyncio.create_task(self.refresher.audit_denial(prefix, reason, team_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _not_ready(model: str, route: Route, why: str = "") -> GatewayError:
    waiting = route.waiting
    if why or (route.blocked and waiting and not route.ready):
        state = waiting[0].state if waiting else State.IDLE.value
        return errors.model_not_ready(
            model, state, None, [], why or f"scaling blocked: {route.blocked}"
        )
    if waiting:
        etas = [b.ready_eta_s for b in waiting if b.ready_eta_s is not None]
        eta = max(0.0, round(min(etas) - time.time(), 1)) if etas else None
        return errors.model_not_ready(model, waiting[0].state, eta, [])
    if route.ready:  # ready in the database, but every replica failed just now (cooldown)
        why = "its engine did not answer; retrying shortly"
        return errors.model_not_ready(model, State.UNHEALTHY.value, None, [], why)
    failed = route.backends[0]
    findings = [{"code": c, "title": t, "remedy": r} for c, t, r in failed.diagnosis]
    return errors.model_not_ready(model, failed.state, None, findings, failed.error)


def _parse_call(key: KeyEntry, path: str, body: bytes, started: float, arrived: float) -> Call:
    try:
        payload = json.loads(body)
    except ValueError:
        raise errors.bad_request("The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise errors.bad_request("The request body must be a JSON object.")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise errors.bad_request("Name the model: 'model' is required.", param="model")
    stream = payload.get("stream") is True and path != "/v1/embeddings"
    strip = False
    if stream:
        options = payload.get("stream_options")
        asked = isinstance(options, dict) and options.get("include_usage") is True
        if not asked:
            # vLLM reports a stream's usage only when asked; ask, and drop the extra chunk.
            payload["stream_options"] = {**(options or {}), "include_usage": True}
            body, strip = json.dumps(payload).encode(), True
    reserve = limits.estimate_tokens(payload, len(body))
    return Call(
        key, model, path, body, stream, strip, affinity_text(payload), reserve, started, arrived
    )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return b""


async def _read_body(receive: Receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise errors.bad_request("The client went away before sending its request.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise GatewayError(
                413,
                "invalid_request_error",
                "The request body is too large.",
                code="request_too_large",
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_json(
    send: Send,
    status: int,
    body: bytes,
    headers: tuple[tuple[bytes, bytes], ...] = (),
    content_type: bytes = b"application/json",
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
    await send({"type": "http.response.body", "body": body})


class Demand:
    """What this gateway tells the scaler per model: requests held here (waiting for a replica
    to be ready) and the time of the last request; published once a second for the models
    asked for in the last ``DEMAND_RECENT_S``."""

    def __init__(self) -> None:
        self.gateway_id = uuid.uuid4().hex[:12]
        self.held: dict[tuple[int, str], int] = {}
        self.last: dict[tuple[int, str], float] = {}

    def arrived(self, name: tuple[int, str], at: float) -> None:
        self.last[name] = at

    def hold(self, name: tuple[int, str], change: int) -> None:
        self.held[name] = self.held.get(name, 0) + change

    def figures(self, queued: dict[tuple[int, str], int]) -> dict:
        now = time.time()
        for name in [n for n, at in self.last.items() if now - at > DEMAND_RECENT_S]:
            del self.last[name]
        names = set(self.last) | {n for n, count in self.held.items() if count} | set(queued)
        return {
            name: (self.held.get(name, 0) + queued.get(name, 0), self.last.get(name))
            for name in names
        }


def _wake_in_thread(deployment_id: int, detail: str) -> str:
    try:
        return wake_on_request(deployment_id, detail)
    finally:
        connection.close()


def create_app() -> Gateway:
    """The application for uvicorn (``factory=True``), configured from Django's settings."""
    return Gateway(GatewayConfig.from_settings())
