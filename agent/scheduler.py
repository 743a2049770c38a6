"""Running the registered periodic jobs from an agent: each agent enqueues its host's jobs on
its own queue, and claims the console's jobs for the whole console (the first agent to claim an
interval enqueues the run)::

    periodic = PeriodicJobs(host)
    periodic.tick()        # every collection round: enqueues what is due, returns their names
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from redis.exceptions import RedisError

from core import naming, periodic, queues
from core.periodic import Scope, SystemJob


class PeriodicJobs:
    """When each registered job is next due, for one host's agent (a monotonic clock)."""

    def __init__(self, host: Any, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.clock = clock
        self._due: dict[str, float] = {}
        self._epoch_seen = False  # the epoch key was there (or set) at an earlier tick

    def tick(self) -> list[str]:
        """Enqueue every job that is due; return their names. A job whose enqueue fails (Redis
        down: the error propagates to the caller's round) stays due and is tried again next
        tick; when Redis lost its data meanwhile, every job is due at once (what was queued,
        scheduled or claimed went with it)."""
        if self._redis_lost_its_data():
            now = self.clock()
            self._due = {job.name: now for job in periodic.registered()}
        enqueued = []
        for job in periodic.registered():
            interval_s = job.interval_s()
            if interval_s > 0 and self._is_due(job, interval_s) and self._enqueue(job, interval_s):
                self._due[job.name] = self.clock() + interval_s
                enqueued.append(job.name)
        return enqueued

    def _is_due(self, job: SystemJob, interval_s: float) -> bool:
        now = self.clock()
        first = interval_s if job.first_after_s is None else job.first_after_s
        return now >= self._due.setdefault(job.name, now + first)

    def _redis_lost_its_data(self) -> bool:
        """True once when the agent's epoch key is missing from Redis (set again here)."""
        key = naming.redis_epoch_key(settings.BERTH_INSTANCE, self.host.name)
        created = bool(queues.redis_connection().set(key, "1", nx=True))
        lost = created and self._epoch_seen
        self._epoch_seen = True
        return lost

    def _enqueue(self, job: SystemJob, interval_s: float) -> bool:
        if job.scope is Scope.HOST:
            queue, args = queues.get_queue(self.host.queue_name), (self.host.pk,)
        elif periodic.claim(job.name, interval_s):
            queue, args = queues.get_queue(queues.DEFAULT_QUEUE), ()
        else:
            return False  # another agent runs it this interval
        # Straight to Redis, not on commit: an enqueue that fails must raise here, so the job
        # stays due instead of being skipped for a whole interval.
        try:
            queue.enqueue(job.func, *args, job_timeout=job.timeout_s, meta={queues.META_KEY: {}})
        except RedisError:
            if job.scope is Scope.CONSOLE:
                with contextlib.suppress(RedisError):
                    periodic.unclaim(job.name)
            raise
        return True
