"""Console-wide pages: the dashboard and the liveness probe."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_not_required
from django.db import connection
from django.db.models import Count
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET
from redis.exceptions import RedisError

from accounts.access import visible_teams
from audit.models import AuditEvent
from core.queues import redis_connection
from deployments.models import Deployment
from deployments.states import State
from deployments.web import api_deployments, groups
from gpus.models import Host
from models_registry.models import Model

RECENT_EVENTS = 10
RECENT_DEPLOYMENTS = 8


def dashboard(request: HttpRequest) -> HttpResponse:
    """What needs attention, and for a new member the next step (register, then deploy)."""
    user = request.user
    context: dict[str, Any] = {"teams": visible_teams(user).prefetch_related("members")}
    if user.is_member or user.is_admin:
        context |= _operator_overview(user)
    if user.is_auditor or user.is_admin:
        context["recent_events"] = AuditEvent.objects.order_by("-seq")[:RECENT_EVENTS]
    return render(request, "dashboard.html", context)


def _operator_overview(user: Any) -> dict[str, Any]:
    """Deployments counted once each (by the state their replicas show), the most recently
    changed ones with their replicas summarised."""
    deployments = Deployment.objects.visible_to(user)
    rows = deployments.order_by().values_list("pk", "replica_of_id", "state")
    by_state = groups.count_by_state(rows)
    recent = list(
        deployments.primaries()
        .select_related("team", "model", "host", "image")
        .order_by("-updated")[:RECENT_DEPLOYMENTS]
    )
    summaries = groups.summarise(recent)
    return {
        "recent_deployments": [(row, summaries[row.pk]) for row in recent],
        "gateway_base_url": api_deployments.gateway_base_url(),
        "deployment_states": [(s, s.label, by_state[s]) for s in State if by_state.get(s)],
        "model_count": Model.objects.visible_to(user).count(),
        "hosts": Host.objects.annotate(gpu_count=Count("gpus")).order_by("name"),
    }


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
