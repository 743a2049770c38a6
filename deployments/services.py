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
from deployments import replicas
from deployments.changes import publish
from deployments.models import Deployment
from deployments.runtime import host_memory
from deployments.runtime.jobs import enqueue_delete, enqueue_launch, enqueue_stop
from deployments.states import ACTIVE, State
from deployments.validation import (
    DeployRequest,
    check_team_quota,
    plan_for,
    request_of,
    validated,
)

__all__ = ["AlreadyDeploying", "DeployRequest", "plan_for", "request_deployment"]


class AlreadyDeploying(ValidationError):
    """The team already has a live deployment of that name (a double submit, a second tab)."""


def request_deployment(user: Any, data: DeployRequest) -> Deployment:
    """Validate, plan and place every replica, record and enqueue their launches (each on its
    host's queue); returns the deployment (its first replica). Raises
    ValidationError/PermissionDenied."""
    try:
        rows = replicas.place(user, data)
    except (ValidationError, PermissionDenied) as exc:
        record_denied(user, exc, team=data.team, name=data.name)
        raise
    deployment = rows[0]
    initial_state = deployment.state

    def create() -> None:
        primary = None
        with audit.chain_transaction():
            # The unique constraint holds per replica index: a name whose older deployment
            # still runs only a further replica (its first failed) would pass it.
            if Deployment.objects.active().filter(team=data.team, name=data.name).exists():
                raise _already_deploying(data)
            for row in rows:
                # A rolled-back attempt leaves the instance looking saved: start each afresh.
                row.pk, row.state, row.replica_of = None, initial_state, primary
                row._state.adding = True
                host_memory.check_and_hold(row)
                row.save()
                if primary is None:
                    primary = row
                    audit.record(
                        Action.DEPLOYMENT_LAUNCH_REQUESTED,
                        target=row,
                        actor=user,
                        **_summary(row, data),
                        replicas=len(rows),
                        hosts=[each.host.name for each in rows],
                    )
                row.transition(State.QUEUED, message=_queued_message(row, len(rows)))
                enqueue_launch(row)

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
        exc = _already_deploying(data)
        record_denied(user, exc, team=data.team, name=data.name)
        raise exc from None
    except (AlreadyDeploying, host_memory.HostMemoryFull) as exc:
        record_denied(user, exc, team=data.team, name=data.name)
        raise
    return deployment


def _already_deploying(data: DeployRequest) -> AlreadyDeploying:
    return AlreadyDeploying(
        {
            "name": f"team {data.team.slug} is already deploying or running {data.name}: "
            "open it from the deployments list, or choose another name"
        }
    )


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


STOPPABLE = ACTIVE - {State.STOPPING}


def _group_of(deployment: Deployment) -> list[Deployment]:
    """Every replica's row, the caller's own instance in place of its fresh copy (so the
    caller sees the state and generation the action gave it)."""
    return [deployment if row.pk == deployment.pk else row for row in deployment.group()]


@refusals_audited(Action.DEPLOYMENT_STOP_REQUESTED)
def request_stop(user: Any, deployment: Deployment) -> None:
    """Ask the hosts' agents to stop every running replica of the deployment (audited)."""
    rows = [row for row in _group_of(deployment) if row.state in STOPPABLE | {State.IDLE}]
    if not rows:
        raise ValidationError({"state": f"a {deployment.state} deployment cannot be stopped"})
    with audit.chain_transaction():
        audit.record(Action.DEPLOYMENT_STOP_REQUESTED, target=deployment, actor=user)
        for row in rows:
            message = f"stop requested by {user.get_username()}"
            if row.state == State.IDLE:  # scaled to zero: no container, nothing held
                row.store(replicas=max(row.min_replicas, 1))
                if not row.transition(State.STOPPED, message=message):
                    raise ValidationError(
                        {"state": "the deployment changed state meanwhile; reload the page"}
                    )
                continue
            if not row.transition(State.STOPPING, message=message):
                raise ValidationError(
                    {"state": "the deployment changed state meanwhile; reload the page"}
                )
            enqueue_stop(row)


@refusals_audited(Action.DEPLOYMENT_DELETE_REQUESTED)
def request_delete(user: Any, deployment: Deployment) -> None:
    """Ask the hosts to remove what is left (cache volumes, stray containers), then the
    records. The audit trail keeps the deployment's history."""
    rows = _group_of(deployment)
    if any(row.state not in (State.FAILED, State.STOPPED) for row in rows):
        raise ValidationError(
            {"state": "only a failed or stopped deployment can be deleted; stop it first"}
        )
    with audit.chain_transaction():
        now = timezone.now()
        for row in rows:
            if not Deployment.objects.filter(
                pk=row.pk,
                generation=row.generation,
                state=row.state,
                delete_requested_at__isnull=True,
            ).update(delete_requested_at=now, updated=now):
                raise ValidationError(
                    {"state": "the deployment changed meanwhile (restarted, or already being "
                     "deleted)"}
                )  # fmt: skip
        deployment.delete_requested_at = now
        audit.record(
            Action.DEPLOYMENT_DELETE_REQUESTED,
            target=deployment,
            actor=user,
            public_id=str(deployment.public_id),
        )
        # Further replicas first: the first replica's row takes theirs with it when it goes.
        for row in sorted(rows, key=lambda row: -row.replica_index):
            enqueue_delete(row)
        publish(deployment.pk, "deleting")


@refusals_audited(Action.DEPLOYMENT_RESTART_REQUESTED)
def request_restart(user: Any, deployment: Deployment) -> None:
    """Start a new generation of every failed or stopped replica of the deployment — only if
    each still passes every rule a new request must (image allowed, model deployable, engine
    flags and remote-code approval, quota, the plan on its host's GPUs today); the fresh plan
    replaces the stored one."""
    group = _group_of(deployment)
    rows = [row for row in group if row.state in (State.FAILED, State.STOPPED)]
    if not rows:
        raise ValidationError(
            {"state": "only a failed or stopped deployment can be restarted; stop it first"}
        )
    fresh = [validated(user, request_of(row)) for row in rows]
    if len(fresh) > 1:  # each passed on its own; together they must fit the quota too
        check_team_quota(deployment.team, sum(row.gpu_count for row in fresh), field="replicas")
    name_taken = ValidationError(
        {
            "name": f"another deployment of team {deployment.team.slug} now serves "
            f"{deployment.name}: stop it first, or deploy the model again under another name"
        }
    )
    others = Deployment.objects.active().filter(team=deployment.team, name=deployment.name)
    if others.exclude(pk__in=[row.pk for row in group]).exists():
        raise name_taken
    try:
        with audit.chain_transaction():
            for row, planned in zip(rows, fresh, strict=True):
                restart_row(user, row, planned)
    except IntegrityError:  # one took the name meanwhile (the per-replica unique constraint)
        raise name_taken from None


def restart_row(user: Any, row: Deployment, fresh: Deployment) -> None:
    """One replica's new generation from its re-validated request (inside a transaction)."""
    host_memory.check_and_hold(row)  # stopped, it held none: take it again
    updated = Deployment.objects.filter(
        pk=row.pk,
        generation=row.generation,
        state=row.state,
        delete_requested_at__isnull=True,  # being deleted: nothing to restart
    )
    if not updated.update(
        plan=fresh.plan,
        gpu_count=fresh.gpu_count,
        host_memory_bytes=fresh.host_memory_bytes,
        stall_timeout_s=fresh.stall_timeout_s,
        health_start_period_s=fresh.health_start_period_s,
        engine_ready_timeout_s=fresh.engine_ready_timeout_s,
        generation=row.generation + 1,
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
    row.generation += 1
    row.host_memory_bytes = fresh.host_memory_bytes
    audit.record(
        Action.DEPLOYMENT_RESTART_REQUESTED,
        target=row,
        actor=user,
        generation=row.generation,
    )
    row.transition(State.QUEUED, message=f"generation {row.generation} queued")
    enqueue_launch(row)


def _queued_message(row: Deployment, count: int) -> str:
    where = f"queued on {row.host.queue_name}"
    return where if count == 1 else f"replica {row.replica_index + 1} of {count} {where}"


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
