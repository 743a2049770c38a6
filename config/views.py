"""Console-wide pages: the dashboard and the liveness probe."""

from __future__ import annotations

from django.contrib.auth.decorators import login_not_required
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET
from redis.exceptions import RedisError

from accounts.access import visible_teams
from audit.models import AuditEvent
from config.queues import redis_connection

RECENT_EVENTS = 10


def dashboard(request: HttpRequest) -> HttpResponse:
    user = request.user
    context = {"teams": visible_teams(user).prefetch_related("members")}
    if user.is_auditor or user.is_admin:
        context["recent_events"] = AuditEvent.objects.order_by("-seq")[:RECENT_EVENTS]
    return render(request, "dashboard.html", context)


@login_not_required
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness of the console for load balancers: the database and Redis answer."""
    checks = {}
    try:
        connection.ensure_connection()
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means "not healthy"
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        redis_connection().ping()
        checks["redis"] = "ok"
    except RedisError as exc:
        checks["redis"] = f"error: {type(exc).__name__}"
    healthy = all(value == "ok" for value in checks.values())
    return JsonResponse(
        {"status": "ok" if healthy else "degraded", **checks}, status=200 if healthy else 503
    )
