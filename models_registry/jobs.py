"""RQ entry points of the model registry: thin, by primary key. A mount with a sync interval is
synced that often, booked through the periodic-job registry::

    enqueue(get_queue(DEFAULT_QUEUE), sync_mount_job, mount.pk)   # a sync on request
"""

from __future__ import annotations

from typing import Any

from core import naming, periodic
from core.periodic import Scope, system_job
from core.queues import DEFAULT_QUEUE, enqueue, get_queue
from models_registry.models import StorageMount
from models_registry.sync import sync_mount

SYNC_TIMEOUT_S = 3600
# How often the registry looks for mounts whose sync is due; intervals are whole minutes.
DUE_CHECK_EVERY_S = 60


def sync_mount_job(mount_pk: int) -> dict[str, Any]:
    """Sync one mount."""
    result = sync_mount(StorageMount.objects.get(pk=mount_pk))
    return {"created": result.created, "updated": result.updated, "missing": result.missing}


@system_job(every=DUE_CHECK_EVERY_S, scope=Scope.CONSOLE)
def sync_due_mounts() -> list[str]:
    """Enqueue the sync of each mount whose interval has come round (claimed per mount and
    interval, so two agents never book one sync twice); returns the job ids."""
    booked = []
    for mount in StorageMount.objects.filter(sync_interval_minutes__gt=0):
        job_id = naming.sync_job_id(mount.pk)
        if periodic.claim(job_id, mount.sync_interval_minutes * 60):
            enqueue(
                get_queue(DEFAULT_QUEUE),
                sync_mount_job,
                mount.pk,
                job_id=job_id,
                job_timeout=SYNC_TIMEOUT_S,
            )
            booked.append(job_id)
    return booked
