"""Background work shown where it matters: a storage mount's sync while it runs, and its last
result. Read from RQ's queue and started registry and from the audit trail, no extra state::

    {% load berth_jobs %}
    {% mount_syncs mounts as syncs %}
    {% for row in syncs.rows %}{{ row.mount.name }} {{ row.running }} {{ row.last }}{% endfor %}
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django import template
from redis.exceptions import RedisError
from rq.job import Job

from audit.actions import Action
from audit.models import AuditEvent
from core.queues import get_queue, redis_connection

register = template.Library()

SYNC_FUNCTION = "models_registry.jobs.sync_mount_job"
# The default queue is short in practice; a longer one is not scanned beyond this many jobs.
SCAN_LIMIT = 200


@dataclass(frozen=True)
class MountSync:
    mount: Any
    running: str | None  # "queued", "running" or None
    since: datetime | None
    last: dict[str, Any] | None  # the last sync's audited result
    last_failed: bool


@dataclass(frozen=True)
class MountSyncs:
    rows: list[MountSync]
    running: bool
    unknown: bool  # Redis did not answer: whether a sync runs is not known


@register.simple_tag
def mount_syncs(mounts: Any) -> MountSyncs:
    """Each mount with its sync in progress (if any) and the result of its last sync."""
    mounts = list(mounts or [])
    try:
        active = _active_syncs()
        unknown = False
    except RedisError:
        active, unknown = {}, True
    rows = [
        MountSync(mount, *active.get(mount.pk, (None, None)), *_last_result(mount))
        for mount in mounts
    ]
    return MountSyncs(rows, any(row.running for row in rows), unknown)


def _active_syncs() -> dict[int, tuple[str, datetime | None]]:
    queue = get_queue("default")
    candidates = [
        ("queued", queue.get_job_ids(0, SCAN_LIMIT - 1)),
        ("running", queue.started_job_registry.get_job_ids(0, SCAN_LIMIT - 1, cleanup=False)),
    ]
    active: dict[int, tuple[str, datetime | None]] = {}
    for state, ids in candidates:
        for job in Job.fetch_many(ids, connection=redis_connection()):
            if job is None or job.func_name != SYNC_FUNCTION or not job.args:
                continue
            since = job.started_at if state == "running" else job.enqueued_at
            # A running sync wins over a queued one for the same mount.
            if state == "running" or job.args[0] not in active:
                active[job.args[0]] = (state, since)
    return active


def _last_result(mount: Any) -> tuple[dict[str, Any] | None, bool]:
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
