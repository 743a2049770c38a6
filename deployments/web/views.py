"""Deployment pages: list, deploy form with the live plan, detail with the live status."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from importlib import import_module
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import SESSION_KEY
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.db import connections
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.middleware.csrf import get_token
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.views.decorators.http import require_POST

import audit
from accounts.access import get_visible_or_404, role_required, visible_teams
from accounts.models import Role, User
from audit.actions import Action, Outcome
from core.contention import Contended
from deployments import replicas, services, sizing
from deployments.models import Deployment, GpuAllocation
from deployments.planning.request import GIB
from deployments.progress import load_progress
from deployments.runtime import host_memory
from deployments.runtime.engine_args import SchemaError, parse_engine_args
from deployments.runtime.launch_spec import container_kwargs, docker_run_line
from deployments.runtime.launcher import build_spec
from deployments.states import ACTIVE, TERMINAL, State
from deployments.validation import cpu_plan_for
from deployments.web import api_deployments, groups, run_line
from deployments.web.deleted import Deleted, find_deleted
from deployments.web.forms import DeployForm
from deployments.web.stream import sse_events

# Stands in for the CSRF token in a status rendered once for every viewer of a stream.
CSRF_SLOT = "berth-csrf-token-slot"

DEPLOYMENTS_PER_PAGE = 50
CPU_PLAN_KEYS = ("cpu_plan", "cpu_segments", "capacity", "free", "held", "host")  # _cpu_preview
SEGMENT_CLASSES = {
    "weights": "seg-weights",
    "kv_cache": "seg-kv",
    "overhead": "seg-overhead",
    "headroom": "seg-free",
}


@role_required(Role.MEMBER)
def deployment_list(request: HttpRequest) -> HttpResponse:
    """One row per deployment (its replicas summarised: "2/3 ready" and their hosts), newest
    first, a page at a time: at 500 deployments the whole table took 0.6 s to render
    (benchmarks/pages_at_scale.py); a page of 50 keeps it flat. The count is exact: a
    deployments table stays in the thousands, far from where COUNT(*) hurts."""
    deployments = (
        Deployment.objects.visible_to(request.user)
        .primaries()
        .select_related("team", "model", "host", "image")
    )
    page = Paginator(deployments, DEPLOYMENTS_PER_PAGE).get_page(request.GET.get("page"))
    summaries = groups.summarise(page.object_list)
    return render(
        request,
        "deployments/list.html",
        {
            "deployments": [(row, summaries[row.pk]) for row in page.object_list],
            "page": page,
            "gateway_base_url": api_deployments.gateway_base_url(),
            "can_deploy": visible_teams(request.user).exists(),
        },
    )


@role_required(Role.MEMBER)
def deploy(request: HttpRequest) -> HttpResponse:
    """The deploy form. Strict: a field the form does not have (``privileged``, ``cap_add``,
    ``volumes``...) is refused by name with 400, and every refusal is audited as ``denied``."""
    form = DeployForm(request.POST if request.method == "POST" else None, user=request.user)
    if request.method != "POST":
        return render(request, "deployments/deploy.html", {"form": form})
    if unknown := form.unknown_fields(request.POST):
        form.add_error(None, form.unknown_fields_message(unknown))
        services.record_denied(
            request.user, ValidationError({key: "unknown field" for key in unknown})
        )
        return render(request, "deployments/deploy.html", {"form": form}, status=400)
    if not form.is_valid():
        services.record_denied(
            request.user,
            ValidationError({field: list(errors) for field, errors in form.errors.items()}),
            team=form.cleaned_data.get("team"),
            name=form.cleaned_data.get("name") or request.POST.get("name", ""),
        )
        return render(request, "deployments/deploy.html", {"form": form})
    try:
        deployment = services.request_deployment(request.user, _deploy_request(form))
    except Contended as exc:  # audited by the service
        form.add_error(None, "The console is busy: submit the form again in a moment.")
        response = render(request, "deployments/deploy.html", {"form": form}, status=503)
        response["Retry-After"] = str(exc.retry_after_s)
        return response
    except (ValidationError, PermissionDenied) as exc:
        _add_errors(form, exc)
        status = 409 if isinstance(exc, services.AlreadyDeploying) else 200
        return render(request, "deployments/deploy.html", {"form": form}, status=status)
    messages.success(request, _queued_message(deployment))
    return redirect("deployment-detail", public_id=deployment.public_id)


@require_POST
@role_required(Role.MEMBER)
def plan_preview(request: HttpRequest) -> HttpResponse:
    """The htmx partial: the plan for what the form says right now, and what the model would
    need on the GPUs people commonly have (also when the chosen host has none)."""
    form = DeployForm(request.POST, user=request.user)
    form.is_valid()
    data = form.cleaned_data
    if not all(data.get(key) for key in ("model", "image")):
        context = {"note": "Choose a model and an image to see the plan."}
        return render(request, "deployments/deploy.html#plan", context)
    try:
        args = parse_engine_args(form.engine_args())
    except SchemaError as exc:
        return render(request, "deployments/deploy.html#plan", {"error": str(exc)})
    count = data.get("replicas") or 1
    if data.get("host"):
        context = _preview(data, args)
        if count > 1:
            context["placement"] = (
                f"{count} replicas on {data['host'].name}, each on GPUs of its own "
                "(refused when the host has room for fewer)."
            )
    else:
        context = _preview_anywhere(data, args, count)
    context["common"] = sizing.on_common_gpus(data["model"], args)
    return render(request, "deployments/deploy.html#plan", context)


def _preview_anywhere(data: dict[str, Any], args: Any, count: int) -> dict[str, Any]:
    """No host chosen: the plan on each host placement may choose, each replica being planned
    again for the host it lands on; the full plan shown is the first fitting host's."""
    hosts = replicas.candidate_hosts()
    what = "the deployment" if count == 1 else f"each of the {count} replicas"
    if not hosts:
        return {
            "error": "No host is online to place the deployment on: start a host's agent "
            "(manage.py berth_agent) or choose a host."
        }
    verdicts = [{"host": host, **_preview({**data, "host": host}, args)} for host in hosts]
    shown = next((v for v in verdicts if v.get("plan") and v["plan"].fits), None)
    shown = shown or next((v for v in verdicts if v.get("plan")), None)
    shown = shown or next((v for v in verdicts if v.get("cpu_plan") and v["cpu_plan"].fits), None)
    shown = shown or next((v for v in verdicts if v.get("cpu_plan")), None) or {}
    return {
        **{key: shown[key] for key in ("plan", "bars", *CPU_PLAN_KEYS) if key in shown},
        "plan_host": shown.get("host"),
        "host_verdicts": verdicts,
        "placement": f"Any host: Berth plans {what} again for the host it lands on, "
        "spread over the online hosts below whose GPUs fit.",
    }


def _preview(data: dict[str, Any], args: Any) -> dict[str, Any]:
    host, image = data["host"], data["image"]
    gpu_count = sizing.gpu_count_for(host, image, data.get("gpu_count"))
    try:
        sizing.check_context_length(
            data["model"], args.max_model_len, data.get("environment") or {}
        )
        if gpu_count == 0:
            if not image.cpu_capable:
                return {"error": "This image needs GPUs: set GPUs to 1 or more, or leave it empty."}
            if not image.is_stand_in:  # a real CPU engine: host memory to plan
                return _cpu_preview(data, args)
            why = "" if data.get("gpu_count") == 0 else f"{host.name} has no GPUs, so GPUs is 0: "
            return {"note": f"{why}a CPU engine, nothing to plan on this host."}
        plan = services.plan_for(data["model"], host, args, gpu_count, image)
    except ValidationError as exc:
        return {"error": " ".join(exc.messages)}
    return {"plan": plan, "bars": _bars(plan)}


def _cpu_preview(data: dict[str, Any], args: Any) -> dict[str, Any]:
    """A CPU engine's plan (``deployments.planning.cpu``): the container's memory limit and what
    it holds, drawn over what the host gives CPU deployments. Raises ValidationError."""
    host = data["host"]
    plan = cpu_plan_for(data["model"], host, args, environment=data.get("environment") or {})
    capacity = host_memory.capacity_bytes(host)
    free = host_memory.free_bytes(host)
    context = {"cpu_plan": plan, "host": host, "capacity": capacity, "free": free}
    if capacity is None or free is None:
        return context
    context["held"] = capacity - free
    parts = [
        ("other CPU deployments", capacity - free, "seg-held"),
        ("weights", plan.weights_bytes, "seg-weights"),
        ("KV cache", plan.kv_cache_space_gib * GIB, "seg-kv"),
        ("engine runtime", plan.runtime_bytes, "seg-overhead"),
        ("left free", max(free - plan.memory_limit_bytes, 0), "seg-free"),
    ]
    total = max(capacity, sum(size for _, size, _ in parts)) or 1
    segments, offset = [], 0.0
    for label, size, css in parts:
        if size > 0:
            percent = round(size * 100 / total, 2)
            segments.append({"label": label, "bytes": size, "css": css, "percent": percent,
                             "offset": round(offset, 2)})  # fmt: skip
            offset += percent
    context["cpu_segments"] = segments
    return context


@role_required(Role.MEMBER)
def deployment_detail(request: HttpRequest, public_id: uuid.UUID) -> HttpResponse:
    try:
        deployment = _load(request, public_id)
    except Http404:
        if (deleted := find_deleted(public_id, request.user)) is None:
            raise
        return _deleted_response(request, deleted)
    if request.htmx:
        return render(request, "deployments/detail.html#status", _status_context(deployment))
    return render(request, "deployments/detail.html", _detail_context(deployment))


def _deleted_response(request: HttpRequest, deleted: Deleted) -> HttpResponse:
    """410 Gone with who deleted it; to the page's own polling, 286 (htmx stops polling)."""
    if request.htmx:
        return render(request, "deployments/deleted.html#gone", {"deleted": deleted}, status=286)
    return render(request, "deployments/deleted.html", {"deleted": deleted}, status=410)


def _release_connections() -> None:
    """Close this thread's database connections, except one inside a transaction (a test's)."""
    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            connection.close()


async def deployment_stream(request: HttpRequest, public_id: uuid.UUID) -> StreamingHttpResponse:
    """Server-Sent Events of the status partial (``role_required`` is sync, so checked here)."""
    user = await request.auser()
    if user.role not in (Role.MEMBER, Role.ADMIN) or not user.is_active:
        raise PermissionDenied("Your role does not give access to this page.")
    deployment = await sync_to_async(_load)(request, public_id)
    # The first replica's page shows every replica's state: it follows all their changes.
    replica_pks = await sync_to_async(_replica_pks)(deployment)
    # A stream stays open for minutes: give back this request's database connection now rather
    # than hold one per viewer (PostgreSQL refuses clients past max_connections).
    await sync_to_async(_release_connections)()

    # The status is rendered once per change for all viewers (deployments.web.stream): its forms
    # get a placeholder for the CSRF token, and each viewer's stream puts in its own.
    token = get_token(request)

    @sync_to_async(thread_sensitive=False)
    def render_status() -> str:
        try:
            fresh = (
                Deployment.objects.select_related(
                    "team", "model__mount", "host", "image", "replica_of__team"
                )
                .filter(pk=deployment.pk)
                .first()
            )
            if fresh is None:  # deleted while the page was open: say so, and by whom
                deleted = find_deleted(public_id, user)
                return render_to_string("deployments/deleted.html#gone", {"deleted": deleted})
            context = {**_status_context(fresh), "csrf_token": CSRF_SLOT}
            return render_to_string("deployments/detail.html#status", context, request=request)
        finally:
            _release_connections()  # this pool thread's: the next render may run on another

    @sync_to_async(thread_sensitive=False)
    def still_allowed() -> bool:
        try:
            return _stream_allowed(request.session.session_key, user.pk, deployment.pk)
        finally:
            _release_connections()

    response = StreamingHttpResponse(
        sse_events(
            deployment.pk,
            render_status,
            still_allowed,
            lambda html: html.replace(CSRF_SLOT, token),
            also=replica_pks,
        ),
        content_type="text/event-stream",
    )
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


def _replica_pks(deployment: Deployment) -> list[int]:
    """The further replicas' pks of a deployment's first replica (none for a further one)."""
    if deployment.is_replica:
        return []
    return list(deployment.group().exclude(pk=deployment.pk).values_list("pk", flat=True))


def _stream_allowed(session_key: str | None, user_pk: int, deployment_pk: int) -> bool:
    """Whether the stream's viewer is still signed in with that session (not signed out,
    expired or flushed) and may still see the deployment (a team removal, a role change)."""
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    if session_key is None or not store.exists(session_key):
        return False
    if str(store.get(SESSION_KEY)) != str(user_pk):
        return False
    viewer = User.objects.filter(pk=user_pk, is_active=True).first()
    if viewer is None or viewer.role not in (Role.MEMBER, Role.ADMIN):
        return False
    if not Deployment.objects.filter(pk=deployment_pk).exists():
        return True  # deleted meanwhile: the render says so, to its team only (find_deleted)
    return Deployment.objects.visible_to(viewer).filter(pk=deployment_pk).exists()


@require_POST
@role_required(Role.MEMBER)
def stop(request: HttpRequest, public_id: uuid.UUID) -> HttpResponse:
    action = Action.DEPLOYMENT_STOP_REQUESTED
    deployment = _load(request, public_id, action)
    return _act(
        request, deployment, action, services.request_stop, lambda: f"Stopping {deployment.name}."
    )


@require_POST
@role_required(Role.MEMBER)
def restart(request: HttpRequest, public_id: uuid.UUID) -> HttpResponse:
    action = Action.DEPLOYMENT_RESTART_REQUESTED
    deployment = _load(request, public_id, action)
    ended = [row.pk for row in deployment.group() if row.state in TERMINAL]

    def done() -> str:
        if deployment.replicas == 1:
            return f"Generation {deployment.generation} of {deployment.name} queued."
        return f"{deployment.name}: {len(ended)} of {deployment.replicas} replicas queued again."

    return _act(request, deployment, action, services.request_restart, done)


@require_POST
@role_required(Role.MEMBER)
def delete(request: HttpRequest, public_id: uuid.UUID) -> HttpResponse:
    action = Action.DEPLOYMENT_DELETE_REQUESTED
    deployment = _load(request, public_id, action)
    return _act(
        request,
        deployment,
        action,
        services.request_delete,
        lambda: f"Deleting {deployment.name}: its cache volume is removed, then the record.",
        then="deployments-index",
    )


def _act(
    request: HttpRequest,
    deployment: Deployment,
    action: Action,
    service: Callable[[Any, Deployment], None],
    done: Callable[[], str],
    then: str = "deployment-detail",
) -> HttpResponse:
    """Run an action on a whole deployment (a further replica's own address refuses, naming
    the deployment). From the page (htmx) the answer is a notice beside the status, which the
    stream updates; without JavaScript, a message and a redirect."""
    try:
        if deployment.is_replica:
            raise groups.refuse_replica_action(request.user, deployment, action)
        service(request.user, deployment)
    except ValidationError as exc:
        text, ok = " ".join(exc.messages), False
    else:
        text, ok = done(), True
    if request.htmx:
        context = {"notice": text, "notice_ok": ok}
        return render(request, "deployments/detail.html#notice", context)
    (messages.success if ok else messages.error)(request, text)
    if ok and then == "deployments-index":
        return redirect(then)
    return redirect("deployment-detail", public_id=deployment.public_id)


def _load(request: HttpRequest, public_id: uuid.UUID, action: Action | None = None) -> Deployment:
    """The deployment if this user may see it, else 404 — for another team's deployment too.
    An action attempted on another team's deployment is audited as ``denied``."""
    queryset = Deployment.objects.select_related(
        "team", "model__mount", "host", "image", "replica_of__team"
    )
    try:
        return get_visible_or_404(queryset, request.user, public_id=public_id)
    except Http404:
        other = Deployment.objects.filter(public_id=public_id).select_related("team").first()
        if action is not None and other is not None:
            audit.record(
                action,
                outcome=Outcome.DENIED,
                team=other.team,
                deployment=str(public_id),
                reason="the deployment belongs to a team this user is not in",
            )
        raise


def _status_context(deployment: Deployment) -> dict:
    """What the live status shows (the partial pushed over SSE and polled): never the container
    spec — the published port it shows is the stored ``host_port``. A deployment's first
    replica also shows every replica, and its actions follow all of them (as the services
    act): Stop while any runs, Restart while any has failed or stopped, Delete once all have."""
    allocations = list(
        deployment.allocations.filter(generation=deployment.generation).select_related("gpu")
    )
    events = list(deployment.events.filter(generation=deployment.generation).order_by("time", "id"))
    rows = _group_rows(deployment)
    states = [row.state for row in rows]
    deleting = any(row.delete_requested_at is not None for row in rows)
    acts = not deployment.is_replica
    return {
        "gpu_memory": [_memory_bar(a.gpu) for a in allocations if a.active],
        "deployment": deployment,
        "events": events,
        "progress": load_progress(deployment, events),
        "allocations": allocations,
        "run_line_values": run_line.current_values(deployment, allocations),
        # A restart is a new generation: its readiness counts from its own request, the first
        # event of the generation (generation 1: the deployment's creation).
        "requested_at": deployment.created
        if deployment.generation == 1 or not events
        else events[0].time,
        "deleting": deleting,
        "replicas": groups.of_rows(rows),
        "replica_rows": _replica_rows(rows) if len(rows) > 1 else [],
        "can_stop": acts
        and any(state in (ACTIVE - {State.STOPPING}) | {State.IDLE} for state in states),
        "can_restart": acts and not deleting and any(state in TERMINAL for state in states),
        "can_delete": acts and not deleting and all(state in TERMINAL for state in states),
    }


def _group_rows(deployment: Deployment) -> list[Deployment]:
    """Every replica's row of a deployment's first replica, this instance in its place; a
    further replica's page is about that replica alone."""
    if deployment.is_replica:
        return [deployment]
    rows = deployment.group().select_related("host")
    return [deployment if row.pk == deployment.pk else row for row in rows]


def _replica_rows(rows: list[Deployment]) -> list[dict[str, Any]]:
    """Each replica with the GPUs its current generation holds (one query)."""
    held: dict[int, list[Any]] = {row.pk: [] for row in rows}
    generations = {row.pk: row.generation for row in rows}
    allocations = GpuAllocation.objects.filter(deployment__in=rows, active=True).select_related(
        "gpu"
    )
    for allocation in allocations.order_by("gpu__index"):
        if allocation.generation == generations[allocation.deployment_id]:
            held[allocation.deployment_id].append(allocation.gpu)
    return [{"row": row, "number": row.replica_index + 1, "gpus": held[row.pk]} for row in rows]


def _queued_message(deployment: Deployment) -> str:
    """Where the request's replicas were queued, for the page it leads to."""
    rows = list(deployment.group().select_related("host"))
    if len(rows) == 1:
        return f"Deployment {deployment.name} queued on {deployment.host.name}."
    hosts = groups.of_rows(rows).hosts_text
    return f"Deployment {deployment.name}: {len(rows)} replicas queued on {hosts}."


def _detail_context(deployment: Deployment) -> dict:
    """The whole page: the status, and the ``docker run`` line rebuilt from the spec."""
    context = _status_context(deployment)
    gpus = run_line.gpus_for_line(deployment, context["allocations"])
    return {
        **context,
        "run_line": run_line.marked(_run_line(deployment, gpus)),
        "endpoint": api_deployments.endpoint(deployment),
        "curl_line": api_deployments.curl_line(deployment),
    }


def _memory_bar(gpu: Any) -> dict:
    """One allocated GPU's latest reading as bar widths (percent): Berth's engines, foreign
    processes, free."""
    total = gpu.memory_total_mib or 0
    berth = gpu.memory_berth_mib or 0
    foreign = gpu.memory_foreign_mib or 0
    if not total:
        return {"gpu": gpu, "known": False}
    scale = 100 / total
    return {
        "gpu": gpu,
        "known": True,
        "berth": berth * scale,
        "foreign": foreign * scale,
        "foreign_x": berth * scale,
        "free_x": (berth + foreign) * scale,
        "free": max(total - berth - foreign, 0) * scale,
    }


def _run_line(deployment: Deployment, gpus: list) -> str:
    try:
        spec = build_spec(deployment, gpus, deployment.host_port or 0)
    except (SchemaError, ValueError):
        return ""
    return docker_run_line(container_kwargs(spec))


def _bars(plan: Any) -> list[dict]:
    memory = plan.per_gpu
    if memory is None:
        return []
    total = max(memory.total_bytes, sum(size for _, size in memory.segments())) or 1
    segments, offset = [], 0.0
    for label, size in memory.segments():
        if size <= 0:
            continue
        percent = round(size * 100 / total, 2)
        segment = {"label": label, "bytes": size, "css": SEGMENT_CLASSES[label], "percent": percent}
        segments.append({**segment, "offset": round(offset, 2)})
        offset += percent
    count = plan.tensor_parallel_size or plan.per_gpu_tensor_parallel_size or 1
    return [{"index": index, "segments": segments} for index in range(count)]


def _deploy_request(form: DeployForm) -> services.DeployRequest:
    data = form.cleaned_data
    return services.DeployRequest(
        team=data["team"],
        model=data["model"],
        host=data["host"],
        image=data["image"],
        name=data["name"],
        gpu_count=data.get("gpu_count"),
        replicas=data.get("replicas") or 1,
        engine_args=form.engine_args(),
        environment=data["environment"],
        override_reason=data.get("override_reason") or "",
    )


def _add_errors(form: DeployForm, exc: ValidationError | PermissionDenied) -> None:
    for field, errors in getattr(exc, "message_dict", {None: [str(exc)]}).items():
        for error in errors:
            form.add_error(field if field in form.fields else None, error)
