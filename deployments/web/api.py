"""A thin JSON door to the same deploy service the form uses, with a strict schema.

``POST /deployments/api/`` with a ``manage``-scoped key (``Authorization: Bearer bk_...``) or
the browser session and the CSRF header (``X-CSRFToken``; see ``api_door``)::

    {"team": "team-a", "model": 12, "host": "gpu-01", "image": "vllm", "name": "llama",
     "gpu_count": 2, "engine_args": {"max_model_len": 8192}, "environment": {"NCCL_DEBUG": "WARN"}}

Answers 201 with the deployment's id and page; 400 with ``{"errors": {field: message}}`` for
anything refused — an unknown key (``privileged``, ``cap_add``...) is named, never ignored;
409 when the team already runs a deployment of that name; 503 with ``Retry-After`` when
contention rolled the request back on every retry; 413 for a body over
``DATA_UPLOAD_MAX_MEMORY_SIZE``. Every refusal is audited as ``denied`` and enqueues nothing.
Not signed in (and no valid key): 401; a failed CSRF check or a role that may not deploy: 403 —
all in JSON. A key cannot send ``override_reason``. ``GET`` lists, reads and stops deployments
live in ``api_deployments``.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib.auth.decorators import login_not_required
from django.core.exceptions import PermissionDenied, RequestDataTooBig, ValidationError
from django.http import HttpRequest, JsonResponse
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from accounts.keys import KeyUser
from accounts.models import slug_validator
from core.contention import Contended
from deployments import services
from deployments.models import MAX_REPLICAS
from deployments.web import api_deployments
from deployments.web.api_door import error, principal
from deployments.web.forms import ApiDeployForm, DeployForm

MAX_DEPTH = 3  # the document, engine_args / environment, nothing deeper
MAX_KEYS = 64  # every key at every level, counted before anything else is read
MAX_GPUS = DeployForm.base_fields["gpu_count"].max_value
FIELDS: dict[str, str] = {
    "team": "the team's slug",
    "model": "the model's id (a whole number)",
    "host": "the host's name, or null: Berth places each replica on an online host that fits",
    "image": "the allow-list entry's name (not an image reference)",
    "name": "1-64 lowercase letters, digits and hyphens",
    "gpu_count": f"a whole number 0-{MAX_GPUS}, or null for the planner's choice",
    "replicas": f"a whole number 1-{MAX_REPLICAS} (default 1): engines behind the model's name",
    "engine_args": "an object of engine settings",
    "environment": 'an object of "NAME": "value" strings',
    "override_reason": "admins only: why to launch although the plan does not fit",
}
REQUIRED = ("team", "model", "image", "name")


class Refusal(Exception):
    def __init__(self, errors: dict[str, str], status: int = 400):
        super().__init__("; ".join(f"{key}: {why}" for key, why in errors.items()))
        self.errors, self.status = errors, status


@require_http_methods(["GET", "POST"])
@login_not_required
@csrf_exempt  # checked by the door (sessions only), so that a refusal is JSON too
def deployments(request: HttpRequest) -> JsonResponse:
    """``GET``: the caller's deployments, cursor-paged; ``POST``: deploy."""
    if request.method == "GET":
        return api_deployments.listing(request)
    return deploy(request)


def deploy(request: HttpRequest) -> JsonResponse:
    """Validate strictly, then call :func:`services.request_deployment` like the form does."""
    user, refused = principal(request, write=True)
    if refused is not None:
        return refused
    team, document = None, None
    try:
        document = _document(request)
        _check_fields(document)
        data = _deploy_request(user, document)
        team = data.team
        deployment = services.request_deployment(user, data)
    except Refusal as exc:
        services.record_denied(
            user, ValidationError(exc.errors), team=team, attempted=attempted(document)
        )
        return JsonResponse({"errors": exc.errors}, status=exc.status)
    except Contended as exc:  # audited by the service
        response = error("database", "the console is busy: send the request again", 503)
        response["Retry-After"] = str(exc.retry_after_s)
        return response
    except (ValidationError, PermissionDenied) as exc:  # audited by the service
        errors = getattr(exc, "message_dict", None) or {"team": _messages(exc)}
        status = 409 if isinstance(exc, services.AlreadyDeploying) else 400
        return JsonResponse({"errors": _flat(errors)}, status=status)
    url = reverse("deployment-detail", kwargs={"public_id": deployment.public_id})
    # Where each replica was queued, in replica order (placement chose them when host was null).
    hosts = list(deployment.group().values_list("host__name", flat=True))
    document = {"id": str(deployment.public_id), "state": deployment.state, "url": url}
    return JsonResponse({**document, "replicas": len(hosts), "hosts": hosts}, status=201)


def _document(request: HttpRequest) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise Refusal({"body": "send Content-Type: application/json"}, status=415)
    try:
        body = request.body
    except RequestDataTooBig:
        raise Refusal(
            {"body": "the body is too large; a deploy request is a few hundred bytes"}, 413
        ) from None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refusal({"body": "the body must be UTF-8 JSON"}) from None
    if (depth := nesting_depth(text)) > MAX_DEPTH:
        raise Refusal({"body": f"JSON nested {depth} levels deep; at most {MAX_DEPTH}"})
    try:
        document = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise Refusal({"body": f"not valid JSON: {exc}"}) from None
    if not isinstance(document, dict):
        raise Refusal({"body": "send one JSON object"})
    return document


def _check_fields(document: dict[str, Any]) -> None:
    if (count := _key_count(document)) > MAX_KEYS:
        raise Refusal({"body": f"{count} keys; a deploy request has at most {MAX_KEYS}"})
    if unknown := sorted(set(document) - set(FIELDS)):
        raise Refusal(
            {
                key[:64]: "unknown field: Berth sets container options itself "
                f"(accepted fields: {', '.join(FIELDS)})"
                for key in unknown[:10]
            }
        )
    if missing := [key for key in REQUIRED if key not in document]:
        raise Refusal({key: f"required: {FIELDS[key]}" for key in missing})


def attempted(document: dict[str, Any] | None) -> dict[str, str]:
    """What a refused request asked for, for its ``denied`` audit row: the identifying fields
    as short text (whatever their type), never the whole body."""
    if not document:
        return {}
    return {
        key: str(document[key])[:64]
        for key in ("team", "name", "model", "host", "image", "gpu_count", "replicas")
        if key in document
    }


def nesting_depth(text: str) -> int:
    """How deeply ``text``'s arrays and objects nest, read without parsing (so a 1,000-level
    document is refused before the parser recurses into it)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _key_count(value: Any) -> int:
    if isinstance(value, dict):
        return len(value) + sum(_key_count(item) for item in value.values())
    if isinstance(value, list):
        return sum(_key_count(item) for item in value)
    return 0


def _deploy_request(user: Any, document: dict[str, Any]) -> services.DeployRequest:
    errors: dict[str, str] = {}
    for key in ("team", "host", "image", "name", "override_reason"):
        if key == "host" and document.get(key) is None:
            continue  # null or left out: placement chooses each replica's host
        if key in document and not isinstance(document[key], str):
            errors[key] = f"must be a string: {FIELDS[key]}"
    for key in ("engine_args", "environment"):
        if not isinstance(document.get(key, {}), dict):
            errors[key] = f"must be {FIELDS[key]}"
    if "override_reason" in document and isinstance(user, KeyUser):
        errors["override_reason"] = (
            "an API key cannot override a plan; an admin does that from the console"
        )
    elif "override_reason" in document and not user.is_admin:
        errors["override_reason"] = "only admins may launch a plan that does not fit"
    model_id, gpu_count = document["model"], document.get("gpu_count")
    if isinstance(model_id, bool) or not isinstance(model_id, int):
        errors["model"] = f"must be {FIELDS['model']}"
    if gpu_count is not None and type(gpu_count) is not int:  # bool is an int subclass
        errors["gpu_count"] = f"must be {FIELDS['gpu_count']}"
    if "replicas" in document and type(document["replicas"]) is not int:
        errors["replicas"] = f"must be {FIELDS['replicas']}"
    if errors:
        raise Refusal(errors)
    form = _bound_form(user, document)
    data = form.cleaned_data
    return services.DeployRequest(
        team=data["team"],
        model=data["model"],
        host=data["host"],
        image=data["image"],
        name=_name(document["name"]),
        gpu_count=data.get("gpu_count"),
        replicas=data.get("replicas") or 1,
        engine_args=document.get("engine_args", {}),
        environment=document.get("environment", {}),
        override_reason=document.get("override_reason", ""),
    )


def _bound_form(user: Any, document: dict[str, Any]) -> ApiDeployForm:
    """The deploy form's own choices and limits over the document's typed values; another
    team's row reads exactly like a missing one."""
    form = ApiDeployForm(
        {key: document[key] for key in ApiDeployForm.BOUND if document.get(key) is not None},
        user=user,
    )
    if not form.is_valid():
        raise Refusal(
            {
                field: " ".join(messages) + (f" ({FIELDS[field]})" if field in FIELDS else "")
                for field, messages in form.errors.items()
            }
        )
    return form


def _name(raw: str) -> str:
    # fullmatch: the validator searches "^...$", which also passes "llama\n" (the form strips it).
    if slug_validator.regex.fullmatch(raw) is None:
        raise Refusal({"name": f"must be {FIELDS['name']}"})
    return raw


def _messages(exc: Exception) -> list[str]:
    """A refusal without fields (PermissionDenied, a plain ValidationError) as a message list."""
    return list(getattr(exc, "messages", None) or [str(exc)])


def _flat(errors: dict[str, list[str]]) -> dict[str, str]:
    return {field: " ".join(messages) for field, messages in errors.items()}
