"""Model registry pages: list, detail, register (with a live inspection preview), sync."""

from __future__ import annotations

import django_rq
from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST
from redis.exceptions import RedisError

import audit
from accounts.access import get_visible_or_404, role_required, visible_teams
from accounts.models import Role
from audit.actions import Action, Outcome
from core import naming
from core.queues import enqueue, is_pending
from models_registry import services
from models_registry.forms import RegisterModelForm
from models_registry.jobs import SYNC_TIMEOUT_S, sync_mount_job
from models_registry.models import Model, ModelStatus, StorageMount
from models_registry.sync_status import mount_syncs


@role_required(Role.MEMBER)
def model_list(request: HttpRequest) -> HttpResponse:
    models = Model.objects.visible_to(request.user).select_related("team", "mount")
    status = request.GET.get("status", "")
    if status in ModelStatus.values:
        models = models.filter(status=status)
    context = {
        "models": models,
        "statuses": ModelStatus.choices,
        "status": status,
        "syncs": (
            mount_syncs(StorageMount.objects.select_related("team"))
            if request.user.is_admin
            else None
        ),
        "can_register": visible_teams(request.user).exists(),
    }
    return render(request, "models_registry/list.html", context)


@role_required(Role.MEMBER)
def model_detail(request: HttpRequest, pk: int) -> HttpResponse:
    model = get_visible_or_404(Model.objects.select_related("team", "mount"), request.user, pk=pk)
    return render(
        request, "models_registry/detail.html", {"model": model, "where": model.translation()}
    )


@role_required(Role.MEMBER)
def register(request: HttpRequest) -> HttpResponse:
    form = RegisterModelForm(request.POST or None, user=request.user)
    if request.method == "POST" and form.is_valid():
        try:
            model = services.register(
                request.user, form.cleaned_data["team"], form.cleaned_data["path"]
            )
        except ValidationError as exc:
            _add_errors(form, exc)
        else:
            messages.success(
                request, f"Registered {model.path}: {model.get_status_display().lower()}."
            )
            return redirect("model-detail", pk=model.pk)
    elif request.method == "POST":
        audit.record(
            Action.MODEL_REGISTERED,
            outcome=Outcome.DENIED,
            team=visible_teams(request.user).filter(pk=form.data.get("team") or None).first()
            if str(form.data.get("team", "")).isdigit()
            else None,
            reason=_form_errors(form),
            attempted={key: str(form.data.get(key, ""))[:200] for key in ("team", "path")},
        )
    return render(request, "models_registry/register.html", {"form": form})


@require_POST
@role_required(Role.MEMBER)
def register_preview(request: HttpRequest) -> HttpResponse:
    """The htmx preview: what inspection finds at the typed path, before anything is saved."""
    form = RegisterModelForm(request.POST, user=request.user)
    report, error = None, None
    if form.is_valid():
        try:
            report = services.preview(
                request.user, form.cleaned_data["team"], form.cleaned_data["path"]
            )
        except ValidationError as exc:
            error = " ".join(exc.message_dict.get("path", exc.messages))
    else:
        error = _form_errors(form)
    return render(
        request, "models_registry/register.html#preview", {"report": report, "error": error}
    )


@require_POST
@role_required(Role.MEMBER)
def reinspect(request: HttpRequest, pk: int) -> HttpResponse:
    model = get_visible_or_404(Model.objects.select_related("team", "mount"), request.user, pk=pk)
    services.reinspect(model, request.user)
    messages.success(
        request, f"Inspected {model.path} again: {model.get_status_display().lower()}."
    )
    return redirect("model-detail", pk=model.pk)


@require_POST
@role_required(Role.ADMIN)
def sync(request: HttpRequest, pk: int) -> HttpResponse:
    """Queue a sync of one mount (admins)."""
    mount = get_object_or_404(StorageMount, pk=pk)
    queue = django_rq.get_queue("default")
    job_id = naming.sync_job_id(mount.pk)
    try:
        if is_pending(queue, job_id):
            messages.info(request, f"A sync of {mount.name} is already queued or running.")
            return redirect("models-index")
        enqueue(queue, sync_mount_job, mount.pk, job_id=job_id, job_timeout=SYNC_TIMEOUT_S)
    except RedisError as exc:
        audit.record(
            Action.MODELS_SYNC_REQUESTED, target=mount, outcome=Outcome.FAILED, error=str(exc)[:300]
        )
        messages.error(request, f"Could not queue the sync: Redis is unreachable ({exc}).")
        return redirect("models-index")
    audit.record(Action.MODELS_SYNC_REQUESTED, target=mount, team=mount.team, job_id_queued=job_id)
    messages.success(
        request, f"Sync of {mount.name} queued (job {job_id}); its progress shows below."
    )
    return redirect("models-index")


def _add_errors(form: RegisterModelForm, exc: ValidationError | PermissionDenied) -> None:
    for field, errors in getattr(exc, "message_dict", {"path": [str(exc)]}).items():
        for error in errors:
            form.add_error(field if field in form.fields else None, error)


def _form_errors(form: RegisterModelForm) -> str:
    return "; ".join(f"{field}: {' '.join(errors)}" for field, errors in form.errors.items())
