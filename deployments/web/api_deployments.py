"""Reading and stopping deployments over the JSON API (a ``manage`` key or the session)::

    GET  /deployments/api/?limit=50[&cursor=…]   {"results": [...], "next": "<url>" | null}
    GET  /deployments/api/<id>/                  state, endpoint, plan, diagnosis, replicas
    POST /deployments/api/<id>/stop/             202 {"id", "state"}

``<id>`` is the public UUID that ``POST /deployments/api/`` returns. Pages are keyset pages
(newest first; the cursor is opaque), so a page costs the same however many came before.
Another team's deployment answers 404 like a missing one. Lists hold deployments, not
replicas: each entry says how many replicas are wanted and ready, and on which hosts; the detail
lists every replica (``replica_status``), each with an id of its own that ``GET`` answers.
"""

from __future__ import annotations

import base64
import binascii
import json
import shlex
import uuid
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, JsonResponse
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from audit.actions import Action
from deployments import services
from deployments.models import Deployment, GpuAllocation
from deployments.web import groups
from deployments.web.api_door import error, principal

DEFAULT_LIMIT = 50
MAX_LIMIT = 200


def listing(request: HttpRequest) -> JsonResponse:
    user, refused = principal(request, write=False)
    if refused is not None:
        return refused
    try:
        limit = int(request.GET.get("limit", DEFAULT_LIMIT))
        before = _cursor_value(request.GET.get("cursor"))
    except ValueError:
        return error("cursor", f"limit is 1-{MAX_LIMIT}; cursor is the 'next' link's value", 400)
    if not 1 <= limit <= MAX_LIMIT:
        return error("limit", f"limit is 1-{MAX_LIMIT}", 400)
    rows = (
        Deployment.objects.visible_to(user)
        .primaries()
        .select_related("team", "host")
        .order_by("-pk")
    )
    if before is not None:
        rows = rows.filter(pk__lt=before)
    page = list(rows[: limit + 1])
    following = None
    if len(page) > limit:
        page = page[:limit]
        following = f"{reverse('deployment-api')}?limit={limit}&cursor={_cursor(page[-1].pk)}"
    summaries = groups.summarise(page)
    results = [_summary(d, summaries[d.pk]) for d in page]
    return JsonResponse({"results": results, "next": following})


@require_GET
@login_not_required
def detail(request: HttpRequest, public_id: uuid.UUID) -> JsonResponse:
    user, refused = principal(request, write=False)
    if refused is not None:
        return refused
    deployment = _visible(user, public_id)
    if deployment is None:
        return error("id", "no such deployment", 404)
    if deployment.is_replica:  # a further replica's own id: that replica alone
        return JsonResponse(
            {
                "name": deployment.name,
                "team": deployment.team.slug,
                "replica_of": str(deployment.replica_of.public_id),
                **_replica(deployment, _gpus([deployment])),
            }
        )
    rows = list(deployment.group().select_related("host"))
    gpus = _gpus(rows)
    return JsonResponse(
        {
            **_summary(deployment, groups.of_rows(rows)),
            "generation": deployment.generation,
            "gpu_count": deployment.gpu_count,
            "tensor_parallel_size": deployment.tensor_parallel_size,
            "endpoint": endpoint(deployment),
            "plan": deployment.plan,
            "diagnosis": deployment.diagnosis,
            "last_error": deployment.last_error,
            "ready_at": deployment.ready_at.isoformat() if deployment.ready_at else None,
            "replica_status": [_replica(row, gpus) for row in rows],
        }
    )


@require_POST
@login_not_required
@csrf_exempt  # checked by the door for sessions; a key needs none
def stop(request: HttpRequest, public_id: uuid.UUID) -> JsonResponse:
    user, refused = principal(request, write=True)
    if refused is not None:
        return refused
    deployment = _visible(user, public_id)
    if deployment is None:
        return error("id", "no such deployment", 404)
    try:
        if deployment.is_replica:
            raise groups.refuse_replica_action(user, deployment, Action.DEPLOYMENT_STOP_REQUESTED)
        services.request_stop(user, deployment)
    except ValidationError as exc:  # audited as denied by the service
        return JsonResponse({"errors": {"state": " ".join(exc.messages)}}, status=409)
    return JsonResponse({"id": str(deployment.public_id), "state": deployment.state}, status=202)


def gateway_base_url() -> str:
    """The OpenAI-compatible base URL every deployment is reached at (through the gateway)."""
    return settings.BERTH_GATEWAY_URL.rstrip("/") + "/v1"


def endpoint(deployment: Deployment) -> dict[str, str]:
    """Where clients send requests for this deployment: the gateway, by its served name."""
    return {"base_url": gateway_base_url(), "model": deployment.name}


def curl_line(deployment: Deployment) -> str:
    """A request a member can paste: the key comes from ``$BERTH_API_KEY`` (keys are shown once,
    so the page cannot hold one)."""
    body = json.dumps(
        {"model": deployment.name, "messages": [{"role": "user", "content": "Hello!"}]}
    )
    url = endpoint(deployment)["base_url"] + "/chat/completions"
    return (
        f'curl -sS {shlex.quote(url)} -H "Authorization: Bearer $BERTH_API_KEY" '
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


def _summary(deployment: Deployment, replicas: groups.Replicas) -> dict[str, Any]:
    """A deployment as lists show it: the state its replicas show, how many are ready of how
    many wanted, and their hosts (``host``: the first replica's)."""
    return {
        "id": str(deployment.public_id),
        "name": deployment.name,
        "team": deployment.team.slug,
        "host": deployment.host.name,
        "hosts": [name for name, _ in replicas.host_counts],
        "state": replicas.state.value,
        "replicas": replicas.desired,
        "ready_replicas": replicas.ready,
        "created": deployment.created.isoformat(),
        "url": reverse("deployment-detail", kwargs={"public_id": deployment.public_id}),
    }


def _gpus(rows: list[Deployment]) -> dict[int, list[int]]:
    """The GPU indexes each row's current generation holds, by the row's pk (one query)."""
    held: dict[int, list[int]] = {row.pk: [] for row in rows}
    generations = {row.pk: row.generation for row in rows}
    allocations = GpuAllocation.objects.filter(deployment__in=rows, active=True).order_by(
        "gpu__index"
    )
    for pk, generation, index in allocations.values_list(
        "deployment_id", "generation", "gpu__index"
    ):
        if generation == generations[pk]:
            held[pk].append(index)
    return held


def _replica(row: Deployment, gpus: dict[int, list[int]]) -> dict[str, Any]:
    """One replica's own engine: where it runs (host and published port, which the gateway
    reaches with the engine's key), its GPUs, state and diagnosis."""
    return {
        "index": row.replica_index,
        "id": str(row.public_id),
        "host": row.host.name,
        "port": row.host_port,
        "gpus": gpus[row.pk],
        "state": row.state,
        "generation": row.generation,
        "diagnosis": row.diagnosis,
        "last_error": row.last_error,
        "ready_at": row.ready_at.isoformat() if row.ready_at else None,
        "url": reverse("deployment-detail", kwargs={"public_id": row.public_id}),
    }


def _visible(user: Any, public_id: uuid.UUID) -> Deployment | None:
    rows = Deployment.objects.visible_to(user).select_related("team", "host", "replica_of__team")
    return rows.filter(public_id=public_id).first()


def _cursor(pk: int) -> str:
    return base64.urlsafe_b64encode(f"d{pk}".encode()).decode().rstrip("=")


def _cursor_value(cursor: str | None) -> int | None:
    if not cursor:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError(cursor) from None
    if not text.startswith("d"):
        raise ValueError(cursor)
    return int(text[1:])
