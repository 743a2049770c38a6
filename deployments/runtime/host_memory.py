"""Host memory for CPU deployments: what a host can give, and the reservation that keeps two of
them from oversubscribing it (as GPU allocations do for GPUs).

A CPU deployment holds ``host_memory_bytes`` (its container's memory limit, from the CPU plan)
for as long as it is active; the sum over a host's active deployments may not exceed
``BERTH_CPU_MEMORY_FRACTION`` of the memory its agent reported. The check runs inside the
transaction that makes the deployment active, after a write to the host's row, so two requests
for one host are serialised (a row lock on PostgreSQL, the write lock on SQLite) and the second
sees the first's reservation::

    with transaction.atomic():
        check_and_hold(deployment)    # raises HostMemoryFull
        deployment.save()
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db.models import F, Sum

from deployments.models import Deployment
from gpus.models import Host

GIB = 1024**3


class HostMemoryFull(ValidationError):
    """The host's unreserved memory cannot hold the deployment; names the field and numbers."""


def capacity_bytes(host: Host) -> int | None:
    """What CPU deployments may hold on ``host`` in all; None while its agent has not reported."""
    if not host.memory_total_bytes:
        return None
    return int(host.memory_total_bytes * settings.BERTH_CPU_MEMORY_FRACTION)


def reserved_bytes(host: Host, *, exclude_pk: int | None = None) -> int:
    """Host memory held by the host's active deployments (other than ``exclude_pk``)."""
    held = Deployment.objects.active().filter(host=host).exclude(pk=exclude_pk)
    return held.aggregate(total=Sum("host_memory_bytes"))["total"] or 0


def free_bytes(host: Host, *, exclude_pk: int | None = None) -> int | None:
    """What a new CPU deployment may still take on ``host`` (None: memory not reported)."""
    capacity = capacity_bytes(host)
    if capacity is None:
        return None
    return max(capacity - reserved_bytes(host, exclude_pk=exclude_pk), 0)


def check_and_hold(deployment: Deployment) -> None:
    """Serialise on the host row, then refuse when the deployment's memory no longer fits. Call
    inside the transaction that saves the deployment as active."""
    if not deployment.host_memory_bytes:
        return
    # An UPDATE takes the row lock (PostgreSQL) or the database's write lock (SQLite) before
    # the sum is read, so a concurrent request waits here and then counts this one.
    Host.objects.filter(pk=deployment.host_id).update(cpu_count=F("cpu_count"))
    host = Host.objects.get(pk=deployment.host_id)
    free = free_bytes(host, exclude_pk=deployment.pk)
    if free is None or deployment.host_memory_bytes > free:
        have = "unknown" if free is None else f"{free / GIB:.1f} GiB"
        raise HostMemoryFull(
            {
                "gpu_count": f"{host.name} cannot hold this CPU deployment now: it needs "
                f"{deployment.host_memory_bytes / GIB:.1f} GiB of host memory and {have} is "
                "free for CPU deployments (stop another one, or choose another host)"
            }
        )
