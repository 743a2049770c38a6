"""The last line against contention: a request whose database work was rolled back by another
transaction on every attempt answers 503 with ``Retry-After`` and is audited — never a 500.

Services that can retry their whole transaction do so (``core.contention.retrying``) and report
what they were asked in their own audit row; this middleware catches what reaches the view's
caller anyway (``MIDDLEWARE``, after the request context and the session)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse

from audit.actions import Action, Outcome
from audit.trail import record
from core.contention import RETRY_AFTER_S, Contended, is_contention

logger = logging.getLogger(__name__)


class ContentionMiddleware:
    """503 + ``Retry-After`` (and an audit row) for contention that escaped a view."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exc: Exception) -> HttpResponse | None:
        if not (isinstance(exc, Contended) or is_contention(exc)):
            return None
        try:
            record(
                Action.REQUEST_CONTENDED,
                outcome=Outcome.FAILED,
                method=request.method,
                path=request.path[:300],
                error=str(exc)[:500],
            )
        except DatabaseError:  # still contended: the log line below keeps the evidence
            logger.exception("could not audit a contended request to %s", request.path)
        logger.warning("contention answered 503: %s %s: %s", request.method, request.path, exc)
        response = HttpResponse(
            "The console is busy: send the request again in a moment.\n",
            status=503,
            content_type="text/plain; charset=utf-8",
        )
        response["Retry-After"] = str(RETRY_AFTER_S)
        return response
