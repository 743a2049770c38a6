"""RQ glue for the audit context, and the audit trail's own job.

``enqueue()`` snapshots the current actor and request id into the job's meta; workers run jobs
with :class:`ContextJob`, which restores that snapshot around the job, so ``record()`` inside a
job names the user and request that caused it::

    job_id = enqueue(get_queue(), "audit.jobs.verify_chain")
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from django.conf import settings
from django.db import close_old_connections, transaction
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job

from audit import context

META_KEY = "berth_audit_context"
logger = logging.getLogger(__name__)


class ContextJob(Job):
    """An RQ job that runs under the audit context it was enqueued with."""

    def perform(self) -> Any:
        close_old_connections()
        try:
            with context.bind_job(self.id, self.meta.get(META_KEY) or {}):
                return super().perform()
        finally:
            close_old_connections()


@cache
def redis_connection() -> Redis:
    """One client per process (it pools connections itself)."""
    return Redis.from_url(settings.REDIS_URL, health_check_interval=30)


def get_queue(name: str) -> Queue:
    """Any named queue on Berth's Redis with :class:`ContextJob` — host queues (``host:<name>``)
    are made at run time, which django-rq's configured queues cannot express."""
    return Queue(
        name,
        connection=redis_connection(),
        job_class=ContextJob,
        default_timeout=settings.RQ_QUEUES["default"]["DEFAULT_TIMEOUT"],
    )


def enqueue(
    queue: Queue,
    func: Callable[..., Any] | str,
    *args: Any,
    job_id: str | None = None,
    **options: Any,
) -> str:
    """Enqueue ``func(*args)`` once the current transaction commits and return the job id.

    The id is generated here because an enqueue deferred to commit has no Job object to return
    yet; ``options`` are passed to ``Queue.enqueue`` (``job_timeout``, ``kwargs``, ``meta``...).
    If the transaction rolls back, nothing is enqueued; if Redis is unreachable the error is
    logged and the rows stay committed (reconcile enqueues the job again later).
    """
    job_id = job_id or uuid.uuid4().hex
    meta = {**options.pop("meta", {}), META_KEY: context.snapshot()}

    def push() -> None:
        try:
            queue.enqueue(func, *args, job_id=job_id, meta=meta, **options)
        except RedisError:
            # The rows are committed; the agent's reconcile enqueues the job again once Redis is
            # back (every job is idempotent), so the request that caused it still succeeds.
            logger.exception("could not enqueue %s (%s); reconcile will retry", job_id, func)

    transaction.on_commit(push)
    return job_id


def verify_chain(*, scheduled: bool = False) -> dict[str, Any]:
    """Walk the whole audit chain and record the result as ``audit.verified``. A scheduled run
    books the next one (every ``BERTH_AUDIT_VERIFY_INTERVAL_H`` hours), also when it fails."""
    from audit.verification import verify_and_record

    try:
        result = verify_and_record(scheduled=scheduled)
    finally:
        if scheduled:
            schedule_verification(get_queue("default"))
    return {"ok": result.ok, "checked": result.checked, "first_bad_seq": result.first_bad_seq}


SCHEDULED_VERIFY_PREFIX = "audit-verify-at-"
# A console that was never verified (or not for a whole interval) is verified this soon after
# its default worker starts.
FIRST_RUN_DELAY = timedelta(minutes=1)


def schedule_verification(queue: Queue, *, delay: timedelta | None = None) -> str | None:
    """Book the next periodic chain verification on ``queue`` unless one is already booked.

    The default worker calls this when it starts (``berth_worker default --with-scheduler``),
    and each scheduled run calls it again, so exactly one run is pending at any time. The job
    id names the hour it is due, so two workers starting together book the same job once.
    None when ``BERTH_AUDIT_VERIFY_INTERVAL_H`` is 0 (verification on request only).
    """
    hours = settings.BERTH_AUDIT_VERIFY_INTERVAL_H
    if not hours:
        return None
    for job_id in queue.scheduled_job_registry.get_job_ids():
        if job_id.startswith(SCHEDULED_VERIFY_PREFIX):
            return job_id
    now = datetime.now(UTC)
    if delay is None:
        # Due one interval after the last recorded verification (soon if there was none).
        from audit.verification import latest_status

        last = latest_status().time
        due = max(last + timedelta(hours=hours) if last else now, now + FIRST_RUN_DELAY)
    else:
        due = now + delay
    job_id = f"{SCHEDULED_VERIFY_PREFIX}{due:%Y%m%dT%H}"
    queue.enqueue_at(
        due,
        "audit.jobs.verify_chain",
        scheduled=True,
        job_id=job_id,
        job_timeout=3600,
        meta={META_KEY: {}},  # the system acts, not whoever happened to start the worker
    )
    return job_id
