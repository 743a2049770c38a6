"""The queues of the whole console, and the job class that carries the request context.

``enqueue()`` snapshots the current actor and request id into the job's meta; workers run jobs
with :class:`ContextJob`, which restores that snapshot around the job, so ``record()`` inside a
job names the user and request that caused it::

    job_id = enqueue(get_queue(DEFAULT_QUEUE), verify_chain)
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from functools import cache
from typing import Any

from django.conf import settings
from django.db import close_old_connections, transaction
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from core import context
from core.contention import retrying

DEFAULT_QUEUE = "default"
META_KEY = "berth_audit_context"
logger = logging.getLogger(__name__)


class ContextJob(Job):
    """An RQ job that runs under the audit context it was enqueued with. A run that database
    contention rolled back (a deadlock) runs again, up to ``contention.ATTEMPTS`` times: every
    Berth job is idempotent, and a launch must not die on a lock another transaction held."""

    def _execute(self) -> Any:
        return retrying(super()._execute)

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


def is_pending(queue: Queue, job_id: str) -> bool:
    """Whether the job ``job_id`` is still to run (queued, scheduled, deferred) or running."""
    try:
        status = Job.fetch(job_id, connection=queue.connection).get_status()
    except NoSuchJobError:
        return False
    return status in (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED)
