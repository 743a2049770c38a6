"""The scaling panel of a deployment: its policy (a form, audited), replicas over time against
load (a server-drawn chart from the scaler's samples), and why a scale-up is blocked. Included in
the deployment page (loaded by htmx), and a page of its own without JavaScript."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from django import forms
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone

import audit
from accounts.access import get_visible_or_404, role_required
from accounts.models import Role
from audit.actions import Action, Outcome
from deployments.models import MAX_REPLICAS, Deployment, ScalingSample
from deployments.scaling.policy import PolicyChange, describe, set_policy
from deployments.states import State

CHART_SPAN = timedelta(hours=1)
CHART_WIDTH, CHART_HEIGHT = 600, 120


class PolicyForm(forms.Form):
    autoscale = forms.BooleanField(required=False, help_text="Off: the replicas stay as asked")
    min_replicas = forms.IntegerField(
        min_value=0, max_value=MAX_REPLICAS, help_text="0: scale to zero (idle) when unused"
    )
    max_replicas = forms.IntegerField(min_value=1, max_value=MAX_REPLICAS)
    target_waiting = forms.FloatField(
        min_value=0.1,
        label="Target waiting requests per replica",
        help_text="vLLM's own queue (vllm:num_requests_waiting), the gateway's queue counted in",
    )
    target_kv_cache = forms.FloatField(
        min_value=0.05, max_value=1, label="Target KV cache use (0-1)"
    )
    scale_up_window_s = forms.IntegerField(min_value=0, label="Scale-up window (s)")
    scale_down_window_s = forms.IntegerField(min_value=0, label="Scale-down window (s)")
    idle_after_s = forms.IntegerField(min_value=0, label="Idle after (s) without a request")


def _load(request: HttpRequest, public_id: uuid.UUID) -> Deployment:
    """The deployment's first replica if this user may see it, else 404 (a POST on another
    team's is audited as denied)."""
    queryset = Deployment.objects.select_related("team", "host")
    try:
        row = get_visible_or_404(queryset, request.user, public_id=public_id)
    except Http404:
        other = Deployment.objects.filter(public_id=public_id).select_related("team").first()
        if request.method == "POST" and other is not None:
            audit.record(
                Action.DEPLOYMENT_SCALING_POLICY_CHANGED,
                outcome=Outcome.DENIED,
                team=other.team,
                deployment=str(public_id),
                reason="the deployment belongs to a team this user is not in",
            )
        raise
    return queryset.get(pk=row.primary_id)


@role_required(Role.MEMBER)
def scaling(request: HttpRequest, public_id: uuid.UUID) -> HttpResponse:
    deployment = _load(request, public_id)
    notice = ""
    if request.method == "POST":
        form = PolicyForm(request.POST)
        if form.is_valid():
            try:
                set_policy(request.user, deployment, PolicyChange(**form.cleaned_data))
            except (ValidationError, PermissionDenied) as exc:
                _add_errors(form, exc)
            else:
                if not request.htmx:
                    return redirect("deployment-detail", public_id=deployment.public_id)
                deployment.refresh_from_db()
                notice = "Scaling policy saved."
    else:
        form = PolicyForm(initial=PolicyChange.of(deployment).__dict__)
    context = {**panel_context(deployment), "form": form, "notice": notice}
    template = "deployments/scaling.html#panel" if request.htmx else "deployments/scaling.html"
    return render(request, template, context)


def _add_errors(form: PolicyForm, exc: ValidationError | PermissionDenied) -> None:
    if isinstance(exc, PermissionDenied):
        form.add_error(None, str(exc))
        return
    for field, messages in exc.message_dict.items():
        form.add_error(field if field in form.fields else None, messages)


def panel_context(deployment: Deployment) -> dict[str, Any]:
    """What the panel shows: the policy in words, desired and live replicas, the block, the
    chart's lines."""
    rows = list(deployment.group())
    live = [row for row in rows if row.state not in (State.STOPPED, State.FAILED, State.IDLE)]
    samples = list(
        ScalingSample.objects.filter(
            deployment=deployment, time__gte=timezone.now() - CHART_SPAN
        ).order_by("time")
    )
    return {
        "deployment": deployment,
        "policy": describe(PolicyChange.of(deployment)),
        "live": len(live),
        "ready": sum(1 for row in rows if row.state == State.READY),
        "idle": deployment.state == State.IDLE,
        "waking": deployment.woken_at is not None
        and deployment.state in (State.QUEUED, State.LAUNCHING, State.LOADING),
        "wake_s": _wake_seconds(deployment),
        "chart": chart(samples),
    }


def _wake_seconds(deployment: Deployment) -> float | None:
    if deployment.woken_at and deployment.ready_at and deployment.ready_at > deployment.woken_at:
        return round((deployment.ready_at - deployment.woken_at).total_seconds(), 1)
    return None


def chart(samples: list[ScalingSample]) -> dict[str, Any] | None:
    """Polylines (SVG points) for desired and ready replicas (left scale) and load — requests
    waiting in the engines and the gateways — (right scale) over the samples' time span."""
    if len(samples) < 2:
        return None
    start, end = samples[0].time, samples[-1].time
    span = max((end - start).total_seconds(), 1.0)
    top_replicas = max(max(s.desired for s in samples), max(s.ready for s in samples), 1)
    loads = [s.waiting + s.queued for s in samples]
    top_load = max(max(loads), 1.0)

    def x(sample: ScalingSample) -> float:
        return round((sample.time - start).total_seconds() / span * CHART_WIDTH, 1)

    def y(value: float, top: float) -> float:
        return round(CHART_HEIGHT - value / top * (CHART_HEIGHT - 4), 1)

    def line(values: list[float], top: float) -> str:
        return " ".join(f"{x(s)},{y(v, top)}" for s, v in zip(samples, values, strict=True))

    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "desired": line([s.desired for s in samples], top_replicas),
        "ready": line([s.ready for s in samples], top_replicas),
        "load": line(loads, top_load),
        "top_replicas": top_replicas,
        "top_load": round(top_load, 1),
        "start": start,
        "end": end,
    }
