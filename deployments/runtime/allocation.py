"""Reserving and releasing GPUs for a deployment generation.

Two launches racing for the same GPU cannot both win: the partial unique constraint
``one_active_allocation_per_gpu`` refuses the second insert on SQLite and PostgreSQL alike, and
on PostgreSQL the GPU rows are also locked (``SELECT … FOR UPDATE``) for the transaction, so the
loser waits and then fails cleanly instead of deadlocking::

    reserve(deployment, gpus)    # AllocationConflict if any GPU is already held
    release(deployment)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db import IntegrityError
from django.utils import timezone

import audit
from accounts.models import Team
from audit.actions import Action
from deployments.models import Deployment, GpuAllocation
from gpus.models import Gpu


class AllocationConflict(Exception):
    """A requested GPU is held by another deployment (nothing was reserved)."""


class QuotaExceeded(AllocationConflict):
    """The team would hold more GPUs than its quota allows (nothing was reserved)."""


def team_gpus_in_use(team_id: int, *, exclude_deployment: int | None = None) -> int:
    held = GpuAllocation.objects.filter(active=True, deployment__team_id=team_id)
    if exclude_deployment is not None:
        held = held.exclude(deployment_id=exclude_deployment)
    return held.count()


def check_quota(deployment: Deployment, wanted: int, *, lock: bool = False) -> None:
    """Raise :class:`QuotaExceeded` if the team's GPUs in use plus ``wanted`` pass its quota.
    With ``lock`` (inside the reserving transaction) the team row is locked first, so two
    launches of one team cannot both pass the check (PostgreSQL row lock; SQLite's IMMEDIATE
    transactions are serialized already)."""
    # NO KEY UPDATE: serializes the quota check between launches without blocking the KEY SHARE
    # an audit row's team foreign key takes (lock order: audit/trail.py).
    teams = Team.objects.select_for_update(no_key=True) if lock else Team.objects
    team = teams.get(pk=deployment.team_id)
    if team.gpu_quota is None:
        return
    in_use = team_gpus_in_use(team.pk, exclude_deployment=deployment.pk)
    if in_use + wanted > team.gpu_quota:
        raise QuotaExceeded(
            f"quota exceeded: team {team.slug} uses {in_use} of {team.gpu_quota} GPUs "
            f"and this deployment needs {wanted}; stop another deployment or ask an admin for more"
        )


def reserve(deployment: Deployment, gpus: Sequence[Any]) -> list[GpuAllocation]:
    """Hold ``gpus`` for the deployment's current generation, all or none."""
    ids = sorted(gpu.pk for gpu in gpus)
    try:
        with audit.chain_transaction():
            check_quota(deployment, len(ids), lock=True)
            list(Gpu.objects.select_for_update().filter(pk__in=ids).order_by("pk"))
            held = GpuAllocation.objects.filter(gpu_id__in=ids, active=True).exclude(
                deployment=deployment
            )
            if held.exists():
                raise AllocationConflict(_conflict_message(held))
            allocations = GpuAllocation.objects.bulk_create(
                [
                    GpuAllocation(
                        deployment=deployment, gpu_id=pk, generation=deployment.generation
                    )
                    for pk in ids
                ]
            )
            audit.record(
                Action.GPU_RESERVED,
                target=deployment,
                host=deployment.host.name,
                gpus=[_label(gpu) for gpu in sorted(gpus, key=lambda gpu: gpu.index)],
            )
    except IntegrityError:
        raise AllocationConflict(
            "another launch reserved one of these GPUs at the same moment; try again"
        ) from None
    return allocations


def release(deployment: Deployment, *, reason: str = "") -> int:
    """Release every active allocation of the deployment; returns how many."""
    with audit.chain_transaction():
        held = list(
            GpuAllocation.objects.filter(deployment=deployment, active=True).select_related("gpu")
        )
        if not held:
            return 0
        GpuAllocation.objects.filter(pk__in=[a.pk for a in held]).update(
            active=False, released_at=timezone.now()
        )
        audit.record(
            Action.GPU_RELEASED,
            target=deployment,
            host=deployment.host.name,
            reason=reason,
            gpus=[_label(allocation.gpu) for allocation in held],
        )
    return len(held)


def _label(gpu: Any) -> str:
    return f"{gpu.index} ({gpu.uuid})" if gpu.uuid else str(gpu.index)


def _conflict_message(held: Any) -> str:
    first = held.select_related("gpu", "deployment").first()
    return (
        f"GPU {first.gpu.index} on this host is held by deployment {first.deployment} "
        f"(state {first.deployment.state})"
    )
