"""A storage mount's sync as its page shows it: queued or running (from the one job id each
mount's sync runs under), and the result of the last one (from the audit trail)::

    syncs = mount_syncs(StorageMount.objects.all())
    syncs.running       # True while any sync is queued or running: the page refreshes itself
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis.exceptions import RedisError
from rq.job import Job, JobStatus

from audit.actions import Action
from audit.models import AuditEvent
from core import naming
from core.queues import redis_connection
from models_registry.models import StorageMount

ACTIVE = {JobStatus.QUEUED: "queued", JobStatus.STARTED: "running"}


@dataclass(frozen=True)
class MountSync:
    mount: StorageMount
    running: str | None  # "queued", "running" or None
    since: datetime | None
    last: dict[str, Any] | None  # the last sync's audited result
    last_failed: bool


@dataclass(frozen=True)
class MountSyncs:
    rows: list[MountSync]
    running: bool
    unknown: bool  # Redis did not answer: whether a sync runs is not known


def mount_syncs(mounts: Iterable[StorageMount]) -> MountSyncs:
    """Each mount with its sync in progress (if any) and the result of its last sync."""
    mounts = list(mounts)
    try:
        active, unknown = _active(mounts), False
    except RedisError:
        active, unknown = {}, True
    rows = [
        MountSync(mount, *active.get(mount.pk, (None, None)), *_last_result(mount))
        for mount in mounts
    ]
    return MountSyncs(rows, any(row.running for row in rows), unknown)


def _active(mounts: list[StorageMount]) -> dict[int, tuple[str, datetime | None]]:
    ids = [naming.sync_job_id(mount.pk) for mount in mounts]
    jobs = Job.fetch_many(ids, connection=redis_connection()) if ids else []
    active = {}
    for mount, job in zip(mounts, jobs, strict=True):
        state = ACTIVE.get(job.get_status(refresh=False)) if job is not None else None
        if state is not None:
            active[mount.pk] = (state, job.started_at if state == "running" else job.enqueued_at)
    return active


def _last_result(mount: StorageMount) -> tuple[dict[str, Any] | None, bool]:
    event = (
        AuditEvent.objects.filter(
            action=Action.MODELS_SYNCED,
            target_type="models_registry.storagemount",
            target_id=str(mount.pk),
        )
        .order_by("-seq")
        .first()
    )
    if event is None:
        return None, False
    return event.payload, event.outcome != "ok"
