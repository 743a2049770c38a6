"""Running the registered periodic jobs from an agent: each agent enqueues its host's jobs on
its own queue, and claims the console's jobs for the whole console (the first agent to claim an
interval enqueues the run)::

    periodic = PeriodicJobs(host)
    periodic.tick()        # every collection round: enqueues what is due, returns their names
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from core import periodic, queues
from core.periodic import Scope, SystemJob


class PeriodicJobs:
    """When each registered job is next due, for one host's agent (a monotonic clock)."""

    def __init__(self, host: Any, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.clock = clock
        self._due: dict[str, float] = {}

    def tick(self) -> list[str]:
        """Enqueue every job that is due; return their names."""
        enqueued = []
        for job in periodic.registered():
            interval_s = job.interval_s()
            if interval_s > 0 and self._is_due(job, interval_s) and self._enqueue(job, interval_s):
                enqueued.append(job.name)
        return enqueued

    def _is_due(self, job: SystemJob, interval_s: float) -> bool:
        now = self.clock()
        first = interval_s if job.first_after_s is None else job.first_after_s
        due = self._due.setdefault(job.name, now + first)
        if now < due:
            return False
        self._due[job.name] = now + interval_s
        return True

    def _enqueue(self, job: SystemJob, interval_s: float) -> bool:
        if job.scope is Scope.HOST:
            queue, args = queues.get_queue(self.host.queue_name), (self.host.pk,)
        elif periodic.claim(job.name, interval_s):
            queue, args = queues.get_queue(queues.DEFAULT_QUEUE), ()
        else:
            return False  # another agent runs it this interval
        queues.enqueue(queue, job.func, *args, job_timeout=job.timeout_s)
        return True
