"""Deployment actions spanning rows and the outside world: plan, request, stop, restart.

Every refusal names the field and the fix, enqueues nothing, calls no Docker API and is audited
as ``denied``; every accepted request is audited and enqueued on the host's queue on commit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError
from django.utils import timezone

import audit
from accounts.access import team_ids
from accounts.models import Team
from audit.actions import Action, Outcome
from audit.trail import denial_reason
from core.contention import Contended, retrying
from deployments import planning, sizing
from deployments.changes import publish
from deployments.models import Deployment, EngineImage
from deployments.planning.cpu import CpuPlan, CpuPlanRequest, plan_cpu
from deployments.planning.stored import StoredPlan
from deployments.runtime import host_checks, host_memory
from deployments.runtime.allocation import team_gpus_in_use
from deployments.runtime.engine_args import (
    EngineArgs,
    SchemaError,
    parse_engine_args,
    parse_environment,
)
from deployments.runtime.jobs import enqueue_delete, enqueue_launch, enqueue_stop
from deployments.states import ACTIVE, State

MIB = 1024**2
DEFAULT_STALL_TIMEOUT_S = 300  # CPU stand-in engines and plans without timers


class AlreadyDeploying(ValidationError):
    """The team already has a live deployment of that name (a double submit, a second tab)."""


@dataclass
class DeployRequest:
    """What the deploy form or an API sends, before validation."""

    team: Team
    model: Any  # models_registry.Model
    host: Any  # gpus.Host
    image: EngineImage
    name: str
    gpu_count: int | None = None  # None: the planner chooses (the smallest TP that fits)
    engine_args: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    override_reason: str = ""  # admins only: launch although the plan does not fit


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


def request_deployment(user: Any, data: DeployRequest) -> Deployment:
    """Validate, plan, record and enqueue a launch; raises ValidationError/PermissionDenied."""
    try:
        deployment = _validated(user, data)
    except (ValidationError, PermissionDenied) as exc:
        record_denied(user, exc, team=data.team, name=data.name)
        raise
    initial_state = deployment.state

    def create() -> None:
        # A rolled-back attempt leaves the instance looking saved: start each one afresh.
        deployment.pk, deployment.state = None, initial_state
        deployment._state.adding = True
        with audit.chain_transaction():
            host_memory.check_and_hold(deployment)
            deployment.save()
            audit.record(
                Action.DEPLOYMENT_LAUNCH_REQUESTED,
                target=deployment,
                actor=user,
                **_summary(deployment, data),
            )
            deployment.transition(State.QUEUED, message=f"queued on {deployment.host.queue_name}")
            enqueue_launch(deployment)

    try:
        retrying(create)
    except Contended as exc:
        audit.record(
            Action.DEPLOYMENT_LAUNCH_REQUESTED,
            outcome=Outcome.FAILED,
            team=data.team,
            actor=user,
            name=data.name,
            reason=f"the database stayed busy (contention on every attempt): {exc}"[:2000],
        )
        raise
    except IntegrityError:
        exc = AlreadyDeploying(
            {
                "name": f"team {data.team.slug} is already deploying or running {data.name}: "
                "open it from the deployments list, or choose another name"
            }
        )
        record_denied(user, exc, team=data.team, name=data.name)
        raise exc from None
    except host_memory.HostMemoryFull as exc:
        record_denied(user, exc, team=data.team, name=data.name)
        raise
    return deployment


def record_denied(
    user: Any,
    exc: Exception,
    *,
    team: Team | None = None,
    name: Any = "",
    attempted: dict[str, str] | None = None,
) -> None:
    """Audit a refused launch request (``denied``) with the reason each field was refused and,
    where the request never became a ``DeployRequest``, what it asked for (``attempted``)."""
    extra = {"attempted": attempted} if attempted else {}
    audit.record(
        Action.DEPLOYMENT_LAUNCH_REQUESTED,
        outcome=Outcome.DENIED,
        team=team,
        actor=user,
        name=str(name or (attempted or {}).get("name", ""))[:64],
        reason=denial_reason(exc)[:2000],
        **extra,
    )


def _validated(user: Any, data: DeployRequest) -> Deployment:
    if not (getattr(user, "is_admin", False) or data.team.pk in team_ids(user)):
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
        result = cpu_plan_for(data.model, data.host, args, environment=environment)
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
    _check_team_quota(data.team, tp)
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


def _check_team_quota(team: Team, wanted: int) -> None:
    """Refuse a plan the team's GPU quota cannot hold (checked again when reserving)."""
    if team.gpu_quota is not None:
        in_use = team_gpus_in_use(team.pk)
        if in_use + wanted > team.gpu_quota:
            raise ValidationError(
                {
                    "gpu_count": f"quota exceeded: team {team.slug} uses {in_use} of "
                    f"{team.gpu_quota} GPUs and this plan needs {wanted}"
                }
            )


def refusals_audited(action: Action) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Audit a refused action on a deployment as ``denied`` (after its transaction rolled back,
    so the record stays) and re-raise the refusal."""

    def decorator(service: Callable[..., None]) -> Callable[..., None]:
        @wraps(service)
        def wrapped(user: Any, deployment: Deployment) -> None:
            try:
                service(user, deployment)
            except ValidationError as exc:
                audit.record(
                    action,
                    outcome=Outcome.DENIED,
                    target=deployment,
                    actor=user,
                    state=str(deployment.state),
                    reason=denial_reason(exc),
                )
                raise

        return wrapped

    return decorator


@refusals_audited(Action.DEPLOYMENT_STOP_REQUESTED)
def request_stop(user: Any, deployment: Deployment) -> None:
    """Ask the host's agent to stop the engine (audited)."""
    if deployment.state not in ACTIVE - {State.STOPPING}:
        raise ValidationError({"state": f"a {deployment.state} deployment cannot be stopped"})
    with audit.chain_transaction():
        audit.record(Action.DEPLOYMENT_STOP_REQUESTED, target=deployment, actor=user)
        if not deployment.transition(
            State.STOPPING, message=f"stop requested by {user.get_username()}"
        ):
            raise ValidationError(
                {"state": "the deployment changed state meanwhile; reload the page"}
            )
        enqueue_stop(deployment)


@refusals_audited(Action.DEPLOYMENT_DELETE_REQUESTED)
def request_delete(user: Any, deployment: Deployment) -> None:
    """Ask the host to remove what is left (cache volume, stray containers), then the record.
    The audit trail keeps the deployment's history."""
    if deployment.state not in (State.FAILED, State.STOPPED):
        raise ValidationError(
            {"state": "only a failed or stopped deployment can be deleted; stop it first"}
        )
    with audit.chain_transaction():
        now = timezone.now()
        if not Deployment.objects.filter(
            pk=deployment.pk,
            generation=deployment.generation,
            state=deployment.state,
            delete_requested_at__isnull=True,
        ).update(delete_requested_at=now, updated=now):
            raise ValidationError(
                {"state": "the deployment changed meanwhile (restarted, or already being deleted)"}
            )
        deployment.delete_requested_at = now
        audit.record(
            Action.DEPLOYMENT_DELETE_REQUESTED,
            target=deployment,
            actor=user,
            public_id=str(deployment.public_id),
        )
        enqueue_delete(deployment)
        publish(deployment.pk, "deleting")


@refusals_audited(Action.DEPLOYMENT_RESTART_REQUESTED)
def request_restart(user: Any, deployment: Deployment) -> None:
    """Start a new generation of a failed or stopped deployment."""
    if deployment.state not in (State.FAILED, State.STOPPED):
        raise ValidationError(
            {"state": "only a failed or stopped deployment can be restarted; stop it first"}
        )
    with audit.chain_transaction():
        host_memory.check_and_hold(deployment)  # stopped, it held none: take it again
        updated = Deployment.objects.filter(
            pk=deployment.pk,
            generation=deployment.generation,
            state=deployment.state,
            delete_requested_at__isnull=True,  # being deleted: nothing to restart
        )
        if not updated.update(
            generation=deployment.generation + 1,
            container_id="",
            last_error="",
            diagnosis=[],
            logs_read_until=0,
            log_tail=[],
            restart_count=0,
        ):
            raise ValidationError(
                {"state": "the deployment changed meanwhile (or is being deleted); reload the page"}
            )
        deployment.generation += 1
        audit.record(
            Action.DEPLOYMENT_RESTART_REQUESTED,
            target=deployment,
            actor=user,
            generation=deployment.generation,
        )
        deployment.transition(State.QUEUED, message=f"generation {deployment.generation} queued")
        enqueue_launch(deployment)


def _summary(deployment: Deployment, data: DeployRequest) -> dict[str, Any]:
    return {
        "name": deployment.name,
        "model": deployment.model.path,
        "host": deployment.host.name,
        "image": deployment.image.reference,
        "gpu_count": deployment.gpu_count,
        "tensor_parallel_size": deployment.tensor_parallel_size,
        "engine_args": deployment.engine_args,
        "environment": sorted(deployment.environment),
        "plan_fits": getattr(deployment.stored_plan or deployment.cpu_plan, "fits", None),
        "override_reason": data.override_reason[:500],
    }
