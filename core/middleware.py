"""Request id and client address for every request, bound into the audit context."""

from __future__ import annotations

import ipaddress
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponse

from core import context

REQUEST_ID_HEADER = "X-Request-ID"
access_log = logging.getLogger("berth.access")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{7,63}$")


class RequestContextMiddleware:
    """Gives each request an id (``request.id``, the ``X-Request-ID`` response header, every log
    line and audit event) and binds the request into the audit context.

    An incoming ``X-Request-ID`` is kept only behind a trusted proxy (``BERTH_TRUSTED_PROXIES``),
    which is what sets it; from a direct client it would let anyone forge correlation ids.
    """

    sync_capable = True
    async_capable = True

    def __init__(
        self, get_response: Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]
    ):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):  # type: ignore[no-untyped-def]
        if self.is_async:
            return self._acall(request)
        started = time.perf_counter()
        with self._bound(request):
            response = self.get_response(request)
            _finish(request, response, started)
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        with self._bound(request):
            response = await self.get_response(request)
            _finish(request, response, started)
        return response

    def _bound(self, request: HttpRequest):  # type: ignore[no-untyped-def]
        request.id = request_id_for(request)
        request.client_ip = client_ip_for(request)
        return context.bind(
            request=request,
            request_id=request.id,
            client_ip=request.client_ip,
            actor_kind=context.ACTOR_USER,
            job_id=None,
        )


def _finish(request: HttpRequest, response: HttpResponse, started: float) -> None:
    """Tag the response and write the access log line (inside the context: it has the id)."""
    response[REQUEST_ID_HEADER] = request.id
    elapsed_ms = (time.perf_counter() - started) * 1000
    access_log.info(
        "%s %s %s %.0fms %s",
        request.method,
        request.get_full_path()[:300],
        response.status_code,
        elapsed_ms,
        request.client_ip or "-",
    )


def request_id_for(request: HttpRequest) -> str:
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    if settings.BERTH_TRUSTED_PROXIES and _VALID_REQUEST_ID.match(incoming):
        return incoming
    return uuid.uuid4().hex


def client_ip_for(request: HttpRequest) -> str:
    """The client's address. With N trusted proxies, each appends the address it saw to
    X-Forwarded-For, so the client is the Nth entry from the right; entries further left are
    whatever the client claimed and are ignored."""
    remote = request.META.get("REMOTE_ADDR", "")
    proxies = settings.BERTH_TRUSTED_PROXIES
    if proxies:
        forwarded = [part.strip() for part in request.headers.get("X-Forwarded-For", "").split(",")]
        forwarded = [part for part in forwarded if part]
        if len(forwarded) >= proxies:
            remote = forwarded[-proxies]
    try:
        return str(ipaddress.ip_address(remote))
    except ValueError:
        return ""
