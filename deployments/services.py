"""Deployment actions spanning rows and the outside world: plan, request, stop, restart.

Every refusal names the field and the fix, enqueues nothing, calls no Docker API and is audited
as ``denied``; every accepted request is audited and enqueued on the host's queue on commit.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError
from django.utils import timezone

import audit
from accounts.models import Team
from audit.actions import Action, Outcome
from audit.trail import denial_reason
from core.contention import Contended, retrying
from deployments.changes import publish
from deployments.models import Deployment
from deployments.runtime import host_memory
from deployments.runtime.jobs import enqueue_delete, enqueue_launch, enqueue_stop
from deployments.states import ACTIVE, State
from deployments.validation import DeployRequest, plan_for, request_of, validated

__all__ = ["AlreadyDeploying", "DeployRequest", "plan_for", "request_deployment"]


class AlreadyDeploying(ValidationError):
    """The team already has a live deployment of that name (a double submit, a second tab)."""


def request_deployment(user: Any, data: DeployRequest) -> Deployment:
    """Validate, plan, record and enqueue a launch; raises ValidationError/PermissionDenied."""
    try:
        deployment = validated(user, data)
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
    """Start a new generation of a failed or stopped deployment — only if it still passes every
    rule a new request must (image allowed, model deployable, engine flags and remote-code
    approval, quota, the plan on today's GPUs); the fresh plan replaces the stored one."""
    if deployment.state not in (State.FAILED, State.STOPPED):
        raise ValidationError(
            {"state": "only a failed or stopped deployment can be restarted; stop it first"}
        )
    fresh = validated(user, request_of(deployment))
    with audit.chain_transaction():
        host_memory.check_and_hold(deployment)  # stopped, it held none: take it again
        updated = Deployment.objects.filter(
            pk=deployment.pk,
            generation=deployment.generation,
            state=deployment.state,
            delete_requested_at__isnull=True,  # being deleted: nothing to restart
        )
        if not updated.update(
            plan=fresh.plan,
            gpu_count=fresh.gpu_count,
            stall_timeout_s=fresh.stall_timeout_s,
            health_start_period_s=fresh.health_start_period_s,
            engine_ready_timeout_s=fresh.engine_ready_timeout_s,
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
