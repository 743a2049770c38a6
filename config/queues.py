"""The Redis connection and RQ queues every part of Berth uses.

Queues are built here rather than through ``django_rq.get_queue`` because host queues
(``host:<name>``) are created at run time and django-rq only knows the queues named in settings.
All of them use :class:`audit.jobs.ContextJob`, so a job runs with the audit context of the
request that enqueued it.
"""

from __future__ import annotations

from functools import cache

from django.conf import settings
from redis import Redis
from rq import Queue

from audit.jobs import ContextJob

DEFAULT_QUEUE = "default"


@cache
def redis_connection() -> Redis:
    """One client per process (it pools connections itself)."""
    return Redis.from_url(settings.REDIS_URL, health_check_interval=30)


def get_queue(name: str = DEFAULT_QUEUE) -> Queue:
    """The named queue on Berth's Redis, with Berth's job class."""
    return Queue(
        name,
        connection=redis_connection(),
        job_class=ContextJob,
        default_timeout=settings.RQ_QUEUES["default"]["DEFAULT_TIMEOUT"],
    )
