"""Choosing the GPUs a deployment generation launches on, from the host's fresh readings."""

from __future__ import annotations

import dataclasses
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
    chosen, why_not = _select_on(
        deployment.host,
        Need(count=deployment.gpu_count, memory_mib=memory_needed_mib(deployment)),
        exclude_deployment=deployment.pk,
    )
    return chosen, why_not


def replica_slots(
    deployment: Deployment, *, limit: int, taken: frozenset[str] = frozenset()
) -> tuple[list[list[Any]], str]:
    """How many replicas like ``deployment`` (unsaved: its host, GPU count and plan) its host
    can take now, each on GPUs of its own, up to ``limit``: the GPU sets, and why not more.
    The launch chooses again on the host (readings move); this is the request's check."""
    need = Need(count=deployment.gpu_count, memory_mib=memory_needed_mib(deployment))
    slots: list[list[Any]] = []
    used = set(taken)
    why_not = ""
    while len(slots) < limit:
        chosen, why_not = _select_on(deployment.host, need, also_allocated=used)
        if not chosen:
            break
        slots.append(chosen)
        used.update(gpu_key(gpu.uuid, gpu.index) for gpu in chosen)
    return slots, why_not


def gpu_key(uuid: str, index: int) -> str:
    """A GPU's identity on its host for selection: its UUID, or its index where the source
    reported none (nvidia-smi queries without ``uuid``, such as the field guide's): keyed by
    the empty UUID, every such GPU of a host would count as one."""
    return uuid or f"index:{index}"


def _select_on(
    host: Any,
    need: Need,
    *,
    exclude_deployment: int | None = None,
    also_allocated: set[str] | frozenset[str] = frozenset(),
) -> tuple[list[Any], str]:
    rows = {gpu_key(gpu.uuid, gpu.index): gpu for gpu in host.gpus.select_related("host")}
    held = GpuAllocation.objects.filter(active=True, gpu__host=host)
    if exclude_deployment is not None:
        held = held.exclude(deployment_id=exclude_deployment)
    allocated = {gpu_key(*pair) for pair in held.values_list("gpu__uuid", "gpu__index")}
    allocated |= set(also_allocated)
    now = timezone.now()
    selection = select_gpus(
        [dataclasses.replace(gpu_state(gpu), uuid=key) for key, gpu in rows.items()],
        need,
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
