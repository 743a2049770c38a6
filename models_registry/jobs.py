"""RQ entry points of the model registry: thin, by primary key."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import django_rq

from models_registry.models import StorageMount
from models_registry.sync import sync_mount


def sync_mount_job(mount_pk: int, *, scheduled: bool = False) -> dict[str, Any]:
    """Sync one mount; a scheduled run books the next one (one job id per mount, so the chain
    cannot fork into duplicates)."""
    mount = StorageMount.objects.get(pk=mount_pk)
    try:
        result = sync_mount(mount)
    finally:
        if scheduled:
            schedule_sync(mount)
    return {"created": result.created, "updated": result.updated, "missing": result.missing}


def schedule_sync(mount: StorageMount) -> str | None:
    """Book the mount's next periodic sync (none when its interval is 0)."""
    if not mount.sync_interval_minutes:
        return None
    job_id = f"sync-mount-{mount.pk}"
    django_rq.get_queue("default").enqueue_in(
        timedelta(minutes=mount.sync_interval_minutes),
        "models_registry.jobs.sync_mount_job",
        mount.pk,
        scheduled=True,
        job_id=job_id,
        job_timeout=3600,
    )
    return job_id
