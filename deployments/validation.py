"""The rules a deployment request must pass — for a new request, again at restart, and again in
the launch job on the host (an admin may have disabled the image, revoked a remote-code approval,
lowered the quota, or the model's inspection may have failed since)::

    deployment = validated(user, DeployRequest(...))        # a new request (unsaved row)
    validated(user, request_of(deployment))                 # a restart: the same rules
    validated(None, request_of(deployment))                 # the launch job: no user to check

Each refusal is a ``ValidationError`` naming the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError

import audit
from accounts.access import team_ids
from accounts.models import Team
from audit.actions import Action, Outcome
from audit.trail import denial_reason
from deployments import planning, sizing
from deployments.models import Deployment, EngineImage
from deployments.planning.cpu import CpuPlan, CpuPlanRequest, plan_cpu
from deployments.planning.stored import StoredPlan
from deployments.runtime import host_checks, host_memory
from deployments.runtime.allocation import team_gpus_in_use
from deployments.runtime.diagnostics import Finding
from deployments.runtime.engine_args import (
    EngineArgs,
    SchemaError,
    parse_engine_args,
    parse_environment,
)

MIB = 1024**2
DEFAULT_STALL_TIMEOUT_S = 300  # CPU stand-in engines and plans without timers


@dataclass
class DeployRequest:
    """What the deploy form or an API sends, before validation."""

    team: Team
    model: Any  # models_registry.Model
    host: Any  # gpus.Host; None: placement chooses a host for each replica
    image: EngineImage
    name: str
    gpu_count: int | None = None  # None: the planner chooses (the smallest TP that fits)
    replicas: int = 1
    engine_args: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    override_reason: str = ""  # admins only: launch although the plan does not fit
    # Re-validating an existing deployment: its own GPUs and host memory do not count.
    replaces: int | None = None


def plan_for(
    model: Any, host: Any, args: EngineArgs, gpu_count: int | None, image: Any = None
) -> planning.Plan:
    """The planner's answer for ``model`` on ``host``'s GPUs with these flags."""
    gpus = sizing.host_gpus(host)
    if not gpus:
        if image is not None:
            raise sizing.no_gpus_refusal(host, image)
        raise ValidationError({"host": f"{host.name} reports no GPUs"})
    request = sizing.plan_request(
        args, min(gpu.memory_total_mib for gpu in gpus) * MIB, len(gpus), gpu_count
    )
    try:
        return planning.plan(model.config, request, sizing.weights_summary(model))
    except planning.PlannerError as exc:
        raise ValidationError({"model": f"cannot plan this model: {exc}"}) from None


def cpu_plan_for(
    model: Any,
    host: Any,
    args: EngineArgs,
    *,
    environment: dict | None = None,
    exclude_pk: int | None = None,
) -> CpuPlan:
    """The CPU plan of ``model`` on ``host``'s memory, after the other CPU deployments' share."""
    summary = (
        planning.WeightsSummary(model.parameter_count, model.weights_bytes, dict(model.dtypes))
        if model.parameter_count and model.weights_bytes
        else None
    )
    request = CpuPlanRequest(
        host_memory_bytes=host.memory_total_bytes,
        free_bytes=host_memory.free_bytes(host, exclude_pk=exclude_pk),
        max_model_len=args.max_model_len,
        kv_cache_dtype=args.kv_cache_dtype or "auto",
        dtype=args.dtype or "auto",
        allow_long_context=(environment or {}).get(sizing.LONG_CONTEXT_SWITCH) == "1",
    )
    try:
        return plan_cpu(model.config, request, summary, task=model.task)
    except planning.PlannerError as exc:
        raise ValidationError({"model": f"cannot plan this model: {exc}"}) from None


def validated(user: Any, data: DeployRequest) -> Deployment:
    """Every rule a new request must pass, as an unsaved Deployment with its plan; the same
    function re-validates a restart (``request_of``) and, with ``user`` None (the system, at
    launch time), the launch job. Raises ValidationError naming each field, or
    PermissionDenied for a user outside the team."""
    if user is not None and not (
        getattr(user, "is_admin", False) or data.team.pk in team_ids(user)
    ):
        raise PermissionDenied(f"you are not a member of team {data.team.slug}")
    errors: dict[str, str] = {}
    if data.model.team_id != data.team.pk:
        errors["model"] = "this model belongs to another team"
    elif not data.model.deployable:
        errors["model"] = (
            "the model has inspection errors; fix them (see its page) and inspect it again"
        )
    elif (escape := host_checks.outside_team_storage(data.model)) is not None:
        errors["model"] = f"{escape}: register the team's own directory, not a link to another"
    if not data.image.enabled:
        errors["image"] = "this image is not on the allow-list any more"
    args, environment = EngineArgs(), {}
    try:
        args = parse_engine_args(
            data.engine_args, trust_remote_code_allowed=data.model.remote_code_approved
        )
    except SchemaError as exc:
        errors.update(exc.errors)
    try:
        environment = parse_environment(data.environment)
    except SchemaError as exc:
        errors["environment"] = "; ".join(f"{key} {why}" for key, why in exc.errors.items())
    if not errors:
        try:
            sizing.check_context_length(data.model, args.max_model_len, environment)
        except ValidationError as exc:
            errors.update({key: " ".join(value) for key, value in exc.message_dict.items()})
    if errors:
        raise ValidationError(errors)
    data.gpu_count = sizing.gpu_count_for(data.host, data.image, data.gpu_count)
    gpu_count, plan_json, timers = _gpus_and_plan(user, data, args, environment)
    return Deployment(
        name=data.name,
        team=data.team,
        model=data.model,
        host=data.host,
        image=data.image,
        gpu_count=gpu_count,
        engine_args={k: v for k, v in data.engine_args.items() if v not in (None, "")},
        environment=environment,
        plan=plan_json,
        host_memory_bytes=plan_json.get("memory_limit_bytes", 0) if gpu_count == 0 else 0,
        requested_by=user if getattr(user, "pk", None) else None,  # None: an API key
        **timers,
    )


def _gpus_and_plan(
    user: Any, data: DeployRequest, args: EngineArgs, environment: dict
) -> tuple[int, dict, dict]:
    """The GPUs the deployment will hold (one tensor-parallel rank each; 0 for a CPU engine),
    its stored plan and the timers derived from it."""
    if data.gpu_count == 0:
        if not data.image.cpu_capable:
            raise ValidationError(
                {"gpu_count": "this image needs GPUs; choose at least 1 or a CPU-capable image"}
            )
        if data.image.is_stand_in:  # it loads nothing: no memory to plan or hold
            return 0, {}, {"stall_timeout_s": DEFAULT_STALL_TIMEOUT_S}
        result = cpu_plan_for(
            data.model, data.host, args, environment=environment, exclude_pk=data.replaces
        )
        if not result.fits:
            raise ValidationError({"gpu_count": f"the CPU plan does not fit: {result.reasons[0]}"})
        return 0, result.to_json(), {"stall_timeout_s": DEFAULT_STALL_TIMEOUT_S}
    if not data.image.gpu_capable:
        raise ValidationError({"gpu_count": "this image runs without GPUs only: set GPUs to 0"})
    present = sum(1 for gpu in data.host.gpus.all() if gpu.present)
    if data.gpu_count is not None and data.gpu_count > present:
        raise ValidationError(
            {"gpu_count": f"{data.host.name} has {present} GPUs: choose at most {present}"}
        )
    result = plan_for(data.model, data.host, args, data.gpu_count, data.image)
    if not result.fits:
        if not data.override_reason or not getattr(user, "is_admin", False):
            why = result.reasons[-1] if result.reasons else "the model does not fit"
            hint = f" Try: {result.suggestions[0].message}" if result.suggestions else ""
            raise ValidationError({"gpu_count": f"the plan does not fit: {why}.{hint}"})
        audit.record(
            Action.DEPLOYMENT_PLAN_OVERRIDDEN,
            team=data.team,
            actor=user,
            name=data.name,
            reason=data.override_reason[:500],
            reasons=list(result.reasons)[-3:],
        )
    tp = result.tensor_parallel_size or data.gpu_count or result.per_gpu_tensor_parallel_size or 1
    check_team_quota(data.team, tp, exclude=data.replaces)
    stored = StoredPlan.from_plan(
        result,
        gpu_memory_utilization=args.gpu_memory_utilization
        or planning.DEFAULT_GPU_MEMORY_UTILIZATION,
    )
    timers = {
        "health_start_period_s": result.startup.health_start_period_s,
        "stall_timeout_s": result.startup.stall_timeout_s,
        "engine_ready_timeout_s": result.startup.engine_ready_timeout_s,
    }
    return tp, stored.to_json(), timers


def check_team_quota(
    team: Team, wanted: int, *, exclude: int | None = None, field: str = "gpu_count"
) -> None:
    """Refuse a plan the team's GPU quota cannot hold (checked again when reserving)."""
    if team.gpu_quota is not None:
        in_use = team_gpus_in_use(team.pk, exclude_deployment=exclude)
        if in_use + wanted > team.gpu_quota:
            raise ValidationError(
                {
                    field: f"quota exceeded: team {team.slug} uses {in_use} of "
                    f"{team.gpu_quota} GPUs and this plan needs {wanted}"
                }
            )


def request_of(deployment: Deployment) -> DeployRequest:
    """What ``deployment`` asked for, as a request the rules can be checked against again
    (its own GPUs, if it holds any, do not count against its team's quota)."""
    return DeployRequest(
        team=deployment.team,
        model=deployment.model,
        host=deployment.host,
        image=deployment.image,
        name=deployment.name,
        gpu_count=deployment.gpu_count,
        engine_args=dict(deployment.engine_args),
        environment=dict(deployment.environment),
        replaces=deployment.pk,
    )


def still_allowed(deployment: Deployment) -> None:
    """At launch, on the host: the request must still pass every rule of a new one (the image
    may have been disabled, an approval revoked, the quota lowered since it was queued).
    Raises ``host_checks.Refused`` (audited as ``denied``), which fails the launch before any
    container exists."""
    try:
        validated(None, request_of(deployment))
    except ValidationError as exc:
        reason = denial_reason(exc)
        audit.record(
            Action.DEPLOYMENT_LAUNCH_REFUSED,
            target=deployment,
            outcome=Outcome.DENIED,
            reason=reason[:2000],
        )
        raise host_checks.Refused(
            f"the request is no longer allowed: {reason}",
            Finding(
                "request-no-longer-allowed",
                "The deployment no longer passes the rules of a new request",
                "Fix what the error names (an admin re-enables the image, approves the model's "
                "code, raises the quota; or fix the model), then restart the deployment.",
                None,
                "",
            ),
        ) from None
