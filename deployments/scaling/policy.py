"""Editing a deployment's scaling policy: within the rules and the team's quota, audited::

    set_policy(user, deployment, PolicyChange(autoscale=True, min_replicas=0, max_replicas=3))

The maximum must fit the team's whole quota (GPUs, or host memory for a CPU engine) on its own,
and the minimum what the team's other deployments leave free now, so the scaler is never set up
to ask for what the quota can never give. The desired count is moved inside the new bounds at
once; the scaler's next look adds or drains replicas to match.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError

import audit
from accounts.access import team_ids
from audit.actions import Action, Outcome
from audit.trail import denial_reason
from deployments.changes import publish
from deployments.models import (
    MAX_REPLICAS,
    Deployment,
    DeploymentEvent,
    EventKind,
    GpuAllocation,
)
from deployments.runtime.allocation import team_gpus_in_use
from deployments.runtime.host_memory import GIB, team_reserved_bytes
from deployments.states import State

MAX_WINDOW_S = 24 * 3600
FIELDS = (
    "autoscale",
    "min_replicas",
    "max_replicas",
    "target_waiting",
    "target_kv_cache",
    "scale_up_window_s",
    "scale_down_window_s",
    "idle_after_s",
)


@dataclass(frozen=True)
class PolicyChange:
    autoscale: bool
    min_replicas: int
    max_replicas: int
    target_waiting: float = 2.0
    target_kv_cache: float = 0.8
    scale_up_window_s: int = 30
    scale_down_window_s: int = 300
    idle_after_s: int = 900

    @classmethod
    def of(cls, deployment: Deployment) -> PolicyChange:
        return cls(**{name: getattr(deployment, name) for name in FIELDS})


def set_policy(user: Any, deployment: Deployment, change: PolicyChange) -> None:
    """Store the policy (audited with the old and new values); ValidationError names the field
    and the fix, PermissionDenied for a user outside the team (both audited as denied)."""
    primary = Deployment.objects.select_related("team").get(pk=deployment.primary_id)
    try:
        _check_member(user, primary)
        _check(change)
        _check_quota(primary, change)
        _store(user, primary, change)
    except (ValidationError, PermissionDenied) as exc:
        audit.record(
            Action.DEPLOYMENT_SCALING_POLICY_CHANGED,
            outcome=Outcome.DENIED,
            target=primary,
            actor=user,
            reason=denial_reason(exc)[:2000],
            asked=asdict(change),
        )
        raise


def _check_member(user: Any, primary: Deployment) -> None:
    if not (getattr(user, "is_admin", False) or primary.team_id in team_ids(user)):
        raise PermissionDenied(f"you are not a member of team {primary.team.slug}")


def _check(change: PolicyChange) -> None:
    errors = {}
    if not 1 <= change.max_replicas <= MAX_REPLICAS:
        errors["max_replicas"] = f"choose between 1 and {MAX_REPLICAS}"
    if not 0 <= change.min_replicas <= change.max_replicas:
        errors["min_replicas"] = "choose between 0 (scale to zero when idle) and the maximum"
    if not 0 < change.target_waiting <= 1000:
        errors["target_waiting"] = "requests waiting per replica: more than 0, at most 1000"
    if not 0 < change.target_kv_cache <= 1:
        errors["target_kv_cache"] = "a share of the KV cache: more than 0, at most 1"
    for name in ("scale_up_window_s", "scale_down_window_s", "idle_after_s"):
        if not 0 <= getattr(change, name) <= MAX_WINDOW_S:
            errors[name] = f"seconds, 0-{MAX_WINDOW_S}"
    if change.scale_down_window_s < change.scale_up_window_s:
        errors["scale_down_window_s"] = (
            "at least the scale-up window: a shorter one would drain what was just added"
        )
    if errors:
        raise ValidationError(errors)


def _check_quota(primary: Deployment, change: PolicyChange) -> None:
    team = primary.team
    own = [row.pk for row in primary.group()]
    if team.gpu_quota is not None and primary.gpu_count:
        held_here = GpuAllocation.objects.filter(active=True, deployment_id__in=own).count()
        others = team_gpus_in_use(team.pk) - held_here
        _fits("GPUs", team.gpu_quota, primary.gpu_count, change, others=others)
    if team.host_memory_quota_gib is not None and primary.host_memory_bytes:
        others = team_reserved_bytes(team.pk) - sum(
            row.host_memory_bytes for row in Deployment.objects.filter(pk__in=own).active()
        )
        _fits(
            "GiB of host memory",
            team.host_memory_quota_gib,
            primary.host_memory_bytes / GIB,
            change,
            others=others / GIB,
        )


def _fits(unit: str, quota: float, each: float, change: PolicyChange, *, others: float) -> None:
    if change.max_replicas * each > quota:
        raise ValidationError(
            {
                "max_replicas": f"the team's quota is {quota:g} {unit} and each replica holds "
                f"{each:g}: at most {int(quota // each)} replicas (ask an admin for more)"
            }
        )
    if change.min_replicas * each > quota - others:
        raise ValidationError(
            {
                "min_replicas": f"the team's other deployments hold {others:g} of its {quota:g} "
                f"{unit}; each replica holds {each:g}: a minimum of at most "
                f"{int(max(quota - others, 0) // each)} fits now"
            }
        )


def _store(user: Any, primary: Deployment, change: PolicyChange) -> None:
    old = PolicyChange.of(primary)
    desired = primary.replicas
    if change.autoscale and primary.state != State.IDLE:
        desired = min(max(desired, change.min_replicas, 1), change.max_replicas)
    values = {**asdict(change), "replicas": desired}
    with audit.chain_transaction():
        Deployment.objects.filter(pk=primary.pk).update(**values)
        for name, value in values.items():
            setattr(primary, name, value)
        DeploymentEvent.objects.create(
            deployment=primary,
            generation=primary.generation,
            kind=EventKind.INFO,
            message=f"scaling policy changed by {user.get_username()}: " + describe(change),
            data={"scaling": "policy", "old": asdict(old), "new": asdict(change)},
        )
        audit.record(
            Action.DEPLOYMENT_SCALING_POLICY_CHANGED,
            target=primary,
            actor=user,
            old=asdict(old),
            new=asdict(change),
        )
    publish(primary.pk, "scaling")


def describe(change: PolicyChange) -> str:
    """The policy in one line, as the page and the timeline say it."""
    if not change.autoscale:
        return "autoscaling off"
    zero = f", idle after {change.idle_after_s} s" if change.min_replicas == 0 else ""
    return (
        f"{change.min_replicas}-{change.max_replicas} replicas, up past "
        f"{change.target_waiting:g} waiting per replica or {change.target_kv_cache:.0%} KV cache "
        f"for {change.scale_up_window_s} s, down after {change.scale_down_window_s} s calm{zero}"
    )
