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

from django.db import IntegrityError, transaction
from django.utils import timezone

import audit
from audit.actions import Action
from deployments.models import Deployment, GpuAllocation


class AllocationConflict(Exception):
    """A requested GPU is held by another deployment (nothing was reserved)."""


def reserve(deployment: Deployment, gpus: Sequence[Any]) -> list[GpuAllocation]:
    """Hold ``gpus`` for the deployment's current generation, all or none."""
    from gpus.models import Gpu

    ids = sorted(gpu.pk for gpu in gpus)
    try:
        with transaction.atomic():
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
    with transaction.atomic():
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
