"""Choosing the GPUs a deployment generation launches on, from the host's fresh readings."""

from __future__ import annotations

from typing import Any

from django.utils import timezone

from deployments.models import Deployment, GpuAllocation
from gpus.inventory import gpu_state, policy
from gpus.selection import Need, select_gpus

MIB = 1024**2


def memory_needed_mib(deployment: Deployment) -> int:
    """vLLM needs its whole per-GPU budget (total x utilization) free at start-up."""
    plan = deployment.stored_plan
    budget = plan.per_gpu.budget_bytes if plan and plan.per_gpu else 0
    return int(budget // MIB)


def choose_gpus(deployment: Deployment) -> tuple[list[Any], str]:
    """The GPUs to reserve, or ``([], why not)`` with the reason for every GPU refused.
    Only GPUs a source reported can be returned (selection never invents an index)."""
    host = deployment.host
    rows = {gpu.uuid: gpu for gpu in host.gpus.select_related("host")}
    allocated = set(
        GpuAllocation.objects.filter(active=True, gpu__host=host)
        .exclude(deployment=deployment)
        .values_list("gpu__uuid", flat=True)
    )
    now = timezone.now()
    selection = select_gpus(
        [gpu_state(gpu) for gpu in rows.values()],
        Need(count=deployment.gpu_count, memory_mib=memory_needed_mib(deployment)),
        policy(),
        now=now,
        allocated=allocated,
        host=host.name,
        host_online=host.placeable(now),
    )
    if not selection.ok:
        reasons = "; ".join(f"GPU {r.gpu.index}: {r.detail}" for r in selection.rejected)
        return [], f"{selection.summary} ({reasons})" if reasons else selection.summary
    return [rows[state.uuid] for state in selection.chosen], ""
