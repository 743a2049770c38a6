"""The agent's RQ worker, kept working through a Redis outage.

RQ's worker leaves its work loop on an error it does not expect — a Redis connection error
outside its blocking pop is one — and then fails to register its death on the same dead
connection, so the whole agent exited when Redis went away. :func:`work_until_stopped` runs a
fresh worker again once Redis answers, and returns only when a signal asked it to stop::

    work_until_stopped(host.queue_name, beat=lambda worker: ...)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from redis.exceptions import RedisError
from rq import SimpleWorker

from core.queues import ContextJob, get_queue, redis_connection

log = logging.getLogger(__name__)
# After a Redis outage RQ's worker retries with a backoff of up to a minute; a host's queue
# carries the watchers, so the agent's retries at least every five seconds.
REDIS_RETRY_MAX_S = 5.0
WAIT_FOR_REDIS_S = 1.0


class AgentWorker(SimpleWorker):
    """Jobs run in this process, not a forked work horse (see ``berth_agent``); remembers
    whether a signal asked it to stop, as against leaving its loop on an error."""

    job_class = ContextJob
    max_connection_wait_time = REDIS_RETRY_MAX_S
    stop_asked = False

    def request_stop(self, signum: Any = None, frame: Any = None) -> None:
        self.stop_asked = True
        super().request_stop(signum, frame)

    def beat(self) -> None:
        """Heartbeat from another thread while a job runs here (``core.liveness`` takes a
        started job whose worker went silent for lost). Not before the worker registered:
        RQ would then refuse its birth."""
        if self.birth_date is not None:
            self.heartbeat()


def work_until_stopped(queue_name: str, on_worker: Callable[[AgentWorker], None]) -> None:
    """Work ``queue_name`` until a signal asks to stop; ``on_worker`` gets each worker made."""
    while True:
        worker = AgentWorker([get_queue(queue_name)], connection=redis_connection())
        on_worker(worker)
        try:
            worker.work(with_scheduler=False, logging_level=settings.RQ_LOG_LEVEL)
        except RedisError as exc:
            log.warning("the worker on %s lost Redis (%s)", queue_name, exc)
        if worker.stop_asked:
            return
        log.warning("the worker on %s left its loop; working again once Redis answers", queue_name)
        _wait_for_redis()


def _wait_for_redis() -> None:
    while True:
        try:
            redis_connection().ping()
            return
        except RedisError:
            time.sleep(WAIT_FOR_REDIS_S)
