"""Pages of the gateway: a team's API keys and usage, a model's usage by team, a usage export.

Members of the team and admins manage its keys; auditors see none of this (they read the audit
trail, where every key change is). A new or rotated key is shown once, in the answer to the
POST that made it, and never again. Linked from the team and model pages (by URL name: no app
below the gateway imports it).
"""

from __future__ import annotations

import csv
import uuid
from datetime import timedelta

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.db.models import Count, Q, Sum
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from accounts import keys
from accounts.access import get_visible_or_404, role_required
from accounts.models import ApiKey, Role, Team
from deployments.models import Deployment
from gateway.forms import KeyForm
from gateway.models import UsageMinute
from models_registry.models import Model

USAGE_DAYS = 30
EXPORT_MAX_DAYS = 366
SUMS = {
    "requests": Sum("requests"),
    "errors": Sum("errors"),
    "prompt_tokens": Sum("prompt_tokens"),
    "completion_tokens": Sum("completion_tokens"),
    "latency_ms_sum": Sum("latency_ms_sum"),
}


@role_required(Role.MEMBER)
def team_gateway(request: HttpRequest, slug: str) -> HttpResponse:
    """The team's keys (create here) and its usage over the last 30 days."""
    team = get_visible_or_404(Team.objects.all(), request.user, team_field="pk", slug=slug)
    form = KeyForm(request.POST or None)
    shown_once = None
    if request.method == "POST":
        if form.is_valid():
            try:
                _, shown_once = keys.create_api_key(team, form.settings(), created_by=request.user)
                form = KeyForm()
            except ValidationError as exc:  # audited as denied by the service
                for field, errors in exc.message_dict.items():
                    form.add_error(field if field in form.fields else None, errors)
        else:
            keys.record_refused_creation(team, form.errors.as_text())
    return render(
        request,
        "gateway/team.html",
        _team_context(team, form, shown_once),
        status=201 if shown_once else 200,
    )


@require_POST
@role_required(Role.MEMBER)
def revoke(request: HttpRequest, public_id: uuid.UUID) -> HttpResponse:
    key = get_visible_or_404(
        ApiKey.objects.select_related("team"), request.user, public_id=public_id
    )
    if keys.revoke_api_key(key, reason=f"revoked by {request.user.get_username()}"):
        messages.success(request, f"{key.display} revoked: gateways refuse it within a second.")
    return redirect("gateway-team", slug=key.team.slug)


@require_POST
@role_required(Role.MEMBER)
def rotate(request: HttpRequest, public_id: uuid.UUID) -> HttpResponse:
    key = get_visible_or_404(
        ApiKey.objects.select_related("team"), request.user, public_id=public_id
    )
    try:
        _, shown_once = keys.rotate_api_key(key, created_by=request.user)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect("gateway-team", slug=key.team.slug)
    return render(
        request, "gateway/team.html", _team_context(key.team, KeyForm(), shown_once), status=201
    )


@require_GET
@role_required(Role.MEMBER)
def team_usage_csv(request: HttpRequest, slug: str) -> StreamingHttpResponse:
    """Per-minute usage of the team's keys, oldest first (``?days=N``, default 30)."""
    team = get_visible_or_404(Team.objects.all(), request.user, team_field="pk", slug=slug)
    try:
        days = min(max(int(request.GET.get("days", USAGE_DAYS)), 1), EXPORT_MAX_DAYS)
    except ValueError:
        days = USAGE_DAYS
    rows = (
        UsageMinute.objects.filter(team=team, minute__gte=timezone.now() - timedelta(days=days))
        .order_by("minute", "pk")
        .values_list(
            "minute",
            "key_prefix",
            "model",
            "deployment_id",
            "requests",
            "errors",
            "prompt_tokens",
            "completion_tokens",
            "latency_ms_sum",
            "ttft_ms_sum",
            "ttft_count",
        )
    )
    header = [
        "minute_utc",
        "key_prefix",
        "model",
        "deployment_id",
        "requests",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        "latency_ms_sum",
        "ttft_ms_sum",
        "ttft_count",
    ]
    writer = csv.writer(_Echo())

    def lines():  # type: ignore[no-untyped-def]
        yield writer.writerow(header)
        for row in rows.iterator(chunk_size=2000):
            yield writer.writerow([row[0].isoformat(), *row[1:]])

    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="usage-{team.slug}-{days}d.csv"'
    return response


@require_GET
@role_required(Role.MEMBER)
def model_usage(request: HttpRequest, pk: int) -> HttpResponse:
    """A registered model's usage through the gateway, by team and day (its deployments)."""
    model = get_visible_or_404(Model.objects.select_related("team"), request.user, pk=pk)
    deployment_ids = list(Deployment.objects.filter(model=model).values_list("pk", flat=True))
    since = timezone.now() - timedelta(days=USAGE_DAYS)
    usage = UsageMinute.objects.filter(deployment_id__in=deployment_ids, minute__gte=since)
    by_team = usage.values("team__slug", "team__name").annotate(**SUMS).order_by("-requests")
    return render(
        request,
        "gateway/model_usage.html",
        {
            "model": model,
            "by_team": by_team,
            "days": USAGE_DAYS,
            "deployments": Deployment.objects.filter(model=model)
            .primaries()  # deployments, not each replica (the usage above counts every replica)
            .select_related("team")
            .order_by("-created")[:20],
        },
    )


def _team_context(team: Team, form: KeyForm, shown_once: str | None) -> dict:
    now = timezone.now()
    since = now - timedelta(days=USAGE_DAYS)
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    usage = UsageMinute.objects.filter(team=team, minute__gte=since)
    month = UsageMinute.objects.filter(team=team, minute__gte=month_start).aggregate(
        tokens=Sum("prompt_tokens") + Sum("completion_tokens")
    )
    api_keys = (
        ApiKey.objects.filter(team=team)
        .select_related("created_by")
        .order_by("revoked_at", "-created")
    )
    return {
        "team": team,
        "form": form,
        "shown_once": shown_once,
        "api_keys": api_keys,
        "active_count": api_keys.filter(revoked_at__isnull=True)
        .filter(Q(expires__isnull=True) | Q(expires__gt=now))
        .count(),
        "by_key": usage.values("key_prefix").annotate(**SUMS).order_by("-requests"),
        "by_model": usage.values("model")
        .annotate(**SUMS, keys=Count("key_prefix", distinct=True))
        .order_by("-requests"),
        "month_tokens": month["tokens"] or 0,
        "days": USAGE_DAYS,
        "now": now,
    }


class _Echo:
    """A file-like object whose ``write`` returns what it was given (csv rows, streamed)."""

    def write(self, value: str) -> str:
        return value
