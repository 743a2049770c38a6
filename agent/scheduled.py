"""Moving a host's scheduled jobs onto its queue when they are due, from a thread of the agent.

Watchers re-book themselves a second ahead (``enqueue_in``), so a deployment is looked at only
while something moves due scheduled jobs onto the queue. RQ's scheduler does that from a forked
process that ends when its Redis connection fails, and the worker starts it again only in its
ten-minute maintenance: after a Redis restart no watcher ran for up to ten minutes, and a healthy
engine stayed "loading". This loop keeps going through an outage and moves jobs again within a
second of Redis answering; it holds RQ's own scheduler lock for the queue, so a ``berth_worker
--with-scheduler`` on the same queue never moves a job twice::

    loop = ScheduledJobsLoop(host.queue_name)
    loop.start(); ...; loop.stop()
"""

from __future__ import annotations

import logging
import threading

from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.scheduler import RQScheduler
from rq.utils import current_timestamp

from core.queues import get_queue, redis_connection

log = logging.getLogger(__name__)
TICK_S = 1.0


class ScheduledJobsLoop(threading.Thread):
    """Every :data:`TICK_S`: take (or keep) the queue's scheduler lock, then enqueue every
    scheduled job whose time has come. Never dies of a Redis error."""

    def __init__(self, queue_name: str, *, tick_s: float = TICK_S) -> None:
        super().__init__(name=f"berth-scheduler-{queue_name}", daemon=True)
        self.queue = get_queue(queue_name)
        self.tick_s = tick_s
        self.scheduler = RQScheduler([queue_name], connection=redis_connection())
        self.moved = 0
        self._stopping = threading.Event()
        self._down_since: str | None = None

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.wait(self.tick_s):
            self.tick()
        try:
            self.scheduler.release_locks()
        except RedisError:
            log.warning("could not release the scheduler lock of %s", self.queue.name)

    def tick(self) -> int:
        """Move what is due; the number moved (0 while another scheduler holds the lock)."""
        try:
            self.scheduler.acquire_locks()
            moved = move_due(self.queue) if self.queue.name in self.scheduler.acquired_locks else 0
        except RedisError as exc:
            if self._down_since is None:
                self._down_since = str(exc)
                log.warning("scheduled jobs of %s wait: Redis is unreachable (%s)", self.name, exc)
            return 0
        if self._down_since is not None:
            log.warning("Redis answers again: scheduled jobs of %s move again", self.queue.name)
            self._down_since = None
        self.moved += moved
        return moved


def move_due(queue: Queue) -> int:
    """Enqueue the scheduled jobs of ``queue`` whose time has come; how many."""
    registry = queue.scheduled_job_registry
    moved = 0
    for job_id in registry.get_jobs_to_schedule(current_timestamp()):
        try:
            job = Job.fetch(job_id, connection=queue.connection)
        except NoSuchJobError:
            registry.remove(job_id)
            continue
        queue.enqueue_job(job)  # then out of the registry: a crash between runs it twice, not never
        registry.remove(job_id)
        moved += 1
    return moved
