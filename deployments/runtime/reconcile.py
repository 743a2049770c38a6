"""Reconciling what Docker runs on a host with what the database says should run.

* A container labelled with this console's instance whose deployment is gone, no longer active,
  or on another generation is an orphan: after a grace period, and only after reading the
  database again, it is stopped and removed (it may hold GPU memory nobody can see).
* A deployment that should have a container (launching past the grace period, loading, ready,
  unhealthy) but has none becomes ``failed`` with the reason, and its GPUs are released.
* An allocation held by a deployment that is not active is released.

Everything it does is audited; a run that finds nothing to do writes one ``reconcile.ran``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime

import audit
from audit.actions import Action
from core import naming
from core.liveness import forget, job_liveness
from core.queues import get_queue
from deployments.models import Deployment, GpuAllocation
from deployments.runtime import allocation
from deployments.runtime.engine_host import EngineHost
from deployments.runtime.launcher import fail
from deployments.states import ACTIVE, State

GRACE = timedelta(minutes=2)  # a launch job may be between "create" and "record the id"
# A launch books the first look right after the move to "loading", in the same job: a watcher
# missing this long after the last change is lost (Redis lost it), not on its way.
WATCH_GRACE = timedelta(seconds=15)
EXPECT_CONTAINER = frozenset({State.LOADING, State.READY, State.UNHEALTHY})


@dataclass
class ReconcileResult:
    orphans_removed: list[str] = field(default_factory=list)
    deployments_failed: list[int] = field(default_factory=list)
    allocations_released: int = 0
    jobs_resumed: list[str] = field(default_factory=list)


def reconcile_host(
    host: Any,
    engine: EngineHost,
    *,
    resume: Callable[[str, Deployment], Any],
    now: datetime | None = None,
) -> ReconcileResult:
    """Bring one host's containers and records into agreement (see the module docstring).
    ``resume(kind, deployment)`` enqueues a lost ``launch``/``stop``/``watch`` job again."""
    now = now or timezone.now()
    result = ReconcileResult()
    by_deployment: dict[str, list[Any]] = {}
    for container in engine.containers():
        by_deployment.setdefault(naming.deployment_of(container.labels), []).append(container)
    _remove_orphans(host, by_deployment, now, result)
    _fail_vanished(host, by_deployment, now, result)
    result.allocations_released = _release_stray_allocations(host)
    result.jobs_resumed = _resume_lost_jobs(host, now, resume)
    audit.record(Action.RECONCILE_RAN, host=host.name, **asdict(result))
    return result


def _remove_orphans(
    host: Any, by_deployment: dict[str, list[Any]], now: datetime, result: ReconcileResult
) -> None:
    for deployment_id, containers in by_deployment.items():
        for container in containers:
            if _created(container) > now - GRACE:
                continue
            # Read the database again right before acting: the record may have just been made.
            live = Deployment.objects.filter(
                pk=int(deployment_id) if deployment_id.isdigit() else -1,
                host=host,
                state__in=ACTIVE,
                generation=naming.generation_of(container.labels),
            ).exists()
            if live:
                continue
            container.remove(force=True)
            result.orphans_removed.append(container.name)
            audit.record(
                Action.RECONCILE_ORPHAN_REMOVED,
                host=host.name,
                container=container.name,
                deployment=deployment_id,
                generation=naming.generation_of(container.labels),
            )


def _fail_vanished(
    host: Any, by_deployment: dict[str, list[Any]], now: datetime, result: ReconcileResult
) -> None:
    # Launching deployments are left to _resume_lost_jobs: their launch may not have created
    # the container yet, and running it again is safe.
    expected = Deployment.objects.filter(host=host, state__in=EXPECT_CONTAINER)
    for deployment in expected.select_related("host"):
        names = {container.name for container in by_deployment.get(str(deployment.pk), [])}
        if deployment.container_name in names:
            continue
        fail(
            deployment,
            f"the container {deployment.container_name} is gone from {host.name} "
            "(removed outside Berth, or the host was rebuilt)",
            [],
            release=True,
        )
        result.deployments_failed.append(deployment.pk)


# The job each state waits for; all are idempotent, so running one again is safe.
WAITING_FOR = {
    State.QUEUED: "launch",
    State.LAUNCHING: "launch",
    State.STOPPING: "stop",
}


def _resume_lost_jobs(
    host: Any, now: datetime, resume: Callable[[str, Deployment], Any]
) -> list[str]:
    """Re-enqueue the job a deployment waits for when it will not run: gone from Redis (Redis
    lost it), started by a worker that stopped beating (killed), or scheduled and long overdue
    (no scheduler moved it) — asked of the registries and the worker, not the job's status
    (``core.liveness``). The launch adopts the container it may already have created, the
    watcher picks up where the log cursor stands; every job is idempotent."""
    queue = get_queue(host.queue_name)
    resumed = []
    waiting = Deployment.objects.filter(
        Q(state__in=[*WAITING_FOR, *EXPECT_CONTAINER]) | Q(delete_requested_at__isnull=False),
        host=host,
    )
    for deployment in waiting.select_related("host"):
        state = State(deployment.state)
        # A delete was asked for: the page shows it under way until the record is gone.
        kind = "delete" if deployment.delete_requested_at else WAITING_FOR.get(state, "watch")
        job_id = naming.deployment_job_id(kind, deployment.pk, deployment.generation)
        verdict = job_liveness(queue, job_id)
        if verdict.pending:
            continue
        grace = WATCH_GRACE if kind == "watch" else GRACE
        if not verdict.lost and deployment.updated >= now - grace:
            continue  # just moved: its job (enqueued on commit, or booked next) may be on its way
        forget(queue, job_id)
        resume(kind, deployment)
        why = verdict.why or "no run of it in Redis"
        audit.record(
            Action.RECONCILE_JOB_RESUMED, target=deployment, job=job_id, state=str(state), why=why
        )
        resumed.append(job_id)
    return resumed


def _release_stray_allocations(host: Any) -> int:
    stray = GpuAllocation.objects.filter(active=True, gpu__host=host).exclude(
        deployment__state__in=ACTIVE
    )
    released = 0
    for deployment in Deployment.objects.filter(pk__in=stray.values("deployment_id")):
        released += allocation.release(deployment, reason="deployment not active")
    return released


def _created(container: Any) -> datetime:
    stamp = container.attrs.get("Created", "")
    parsed = parse_datetime(stamp[:26] + "Z" if len(stamp) > 26 else stamp)
    return parsed or timezone.now()
