"""Host memory for CPU deployments: what a host can give, and the reservation that keeps two of
them from oversubscribing it (as GPU allocations do for GPUs).

A CPU deployment holds ``host_memory_bytes`` (its container's memory limit, from the CPU plan)
for as long as it is active; the sum over a host's active deployments may not exceed
``BERTH_CPU_MEMORY_FRACTION`` of the memory its agent reported. The check runs inside the
transaction that makes the deployment active, after a write to the host's row, so two requests
for one host are serialised (a row lock on PostgreSQL, the write lock on SQLite) and the second
sees the first's reservation::

    with transaction.atomic():
        check_and_hold(deployment)    # raises HostMemoryFull (or TeamMemoryQuotaExceeded)
        deployment.save()

Host memory also counts against the team's quota, as GPUs do: ``Team.host_memory_quota_gib`` is
the CPU counterpart of ``Team.gpu_quota``, checked in the same transaction under the team's row
lock, so two replicas of one team cannot both pass it.
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db.models import F, Sum

from accounts.models import Team
from deployments.models import Deployment
from gpus.models import Host

GIB = 1024**3


class HostMemoryFull(ValidationError):
    """The host's unreserved memory cannot hold the deployment; names the field and numbers."""


class TeamMemoryQuotaExceeded(HostMemoryFull):
    """The team's host memory quota cannot hold the deployment; names the field and numbers."""


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
    check_team_quota(deployment)
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


def team_reserved_bytes(team_id: int, *, exclude_pk: int | None = None) -> int:
    """Host memory held by the team's active deployments (other than ``exclude_pk``)."""
    held = Deployment.objects.active().filter(team_id=team_id).exclude(pk=exclude_pk)
    return held.aggregate(total=Sum("host_memory_bytes"))["total"] or 0


def check_team_quota(deployment: Deployment, *, lock: bool = True) -> None:
    """Refuse when the team's CPU engines would hold more host memory than its quota. With
    ``lock`` (inside the holding transaction) the team's row is locked first (NO KEY UPDATE,
    as the GPU quota's check does)."""
    quota = Team.objects.filter(pk=deployment.team_id).values_list(
        "host_memory_quota_gib", flat=True
    )
    if not deployment.host_memory_bytes or quota.first() is None:
        return
    if lock:
        Team.objects.select_for_update(no_key=True).filter(pk=deployment.team_id).first()
    team = Team.objects.get(pk=deployment.team_id)
    limit = (team.host_memory_quota_gib or 0) * GIB
    in_use = team_reserved_bytes(team.pk, exclude_pk=deployment.pk)
    if in_use + deployment.host_memory_bytes > limit:
        raise TeamMemoryQuotaExceeded(
            {
                "replicas": f"quota exceeded: team {team.slug} holds {in_use / GIB:.1f} of "
                f"{team.host_memory_quota_gib} GiB of host memory and this CPU engine needs "
                f"{deployment.host_memory_bytes / GIB:.1f} GiB; stop another deployment or ask "
                "an admin for more"
            }
        )
