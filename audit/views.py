"""The audit review: a filterable, keyset-paginated list of events for auditors and admins."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Any

import django_rq
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST
from redis.exceptions import RedisError

import audit
from audit.actions import Action, ActorKind, Outcome
from audit.jobs import enqueue
from audit.models import AuditEvent

PAGE_SIZE = 50
# Exact-match filters taken from the query string: parameter -> model field.
EXACT_FILTERS = {
    "action": "action",
    "outcome": "outcome",
    "actor": "actor_name",
    "kind": "actor_kind",
    "team": "team_slug",
    "request": "request_id",
    "job": "job_id",
    "target_type": "target_type",
    "target_id": "target_id",
}


def reviewer_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Auditors and admins only (403 otherwise). Duck-typed on the user model's role
    properties, because ``audit`` imports none of Berth's other apps."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        user = request.user
        if not (getattr(user, "is_auditor", False) or getattr(user, "is_admin", False)):
            raise PermissionDenied("Only auditors and admins may read the audit trail.")
        return view(request, *args, **kwargs)

    return wrapped


@reviewer_required
def review(request: HttpRequest) -> HttpResponse:
    events = AuditEvent.objects.order_by("-seq")
    filters = {
        param: request.GET[param].strip()
        for param in EXACT_FILTERS
        if request.GET.get(param, "").strip()
    }
    events = events.filter(**{EXACT_FILTERS[param]: value for param, value in filters.items()})
    before = _positive_int(request.GET.get("before"))
    if before is not None:
        events = events.filter(seq__lt=before)
    page = list(events[: PAGE_SIZE + 1])
    has_more = len(page) > PAGE_SIZE
    page = page[:PAGE_SIZE]
    context = {
        "events": page,
        "filters": filters,
        "next_before": page[-1].seq if has_more else None,
        "actions": Action.choices,
        "outcomes": Outcome.choices,
        "kinds": ActorKind.choices,
        "is_first_page": before is None,
    }
    template = "audit/review.html#rows" if request.htmx else "audit/review.html"
    return render(request, template, context)


@reviewer_required
def event_detail(request: HttpRequest, seq: int) -> HttpResponse:
    event = get_object_or_404(AuditEvent, seq=seq)
    payload = json.dumps(event.payload, indent=2, sort_keys=True)
    return render(request, "audit/event.html", {"event": event, "payload": payload})


@require_POST
@reviewer_required
def request_verification(request: HttpRequest) -> HttpResponse:
    """Queue a full verification of the chain; its result is itself an audit event."""
    queue = django_rq.get_queue("default")
    try:
        queue.connection.ping()
        job_id = enqueue(queue, "audit.jobs.verify_chain", job_timeout=3600)
    except RedisError as exc:
        audit.record(Action.AUDIT_VERIFY_REQUESTED, outcome=Outcome.FAILED, error=str(exc)[:500])
        messages.error(request, f"Could not queue the verification: Redis is unreachable ({exc}).")
        return redirect("audit-review")
    audit.record(Action.AUDIT_VERIFY_REQUESTED, job_id_queued=job_id)
    messages.success(
        request,
        f"Verification queued as job {job_id}; its result appears below as 'Chain verified'.",
    )
    return redirect("audit-review")


def _positive_int(raw: str | None) -> int | None:
    if raw is None or not raw.isdigit():
        return None
    return int(raw)
