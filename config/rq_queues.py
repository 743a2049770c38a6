"""``settings.RQ_QUEUES`` that also lists every host's queue, for the RQ dashboard.

django-rq's dashboard shows the queues named in ``RQ_QUEUES``, but each GPU host's agent works
on a queue of its own (``host:<name>``), created when the host registers — so the dashboard
showed ``default`` only, and never a host's launches. This mapping adds the queues RQ has
registered in Redis (its ``rq:queues`` set), each with the default queue's connection::

    RQ_QUEUES = QueueSettings(default={"URL": REDIS_URL, "DEFAULT_TIMEOUT": 600})
"""

from __future__ import annotations

from collections.abc import ItemsView
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

BASE = "default"
HOST_QUEUE_PREFIX = "host:"
REDIS_TIMEOUT_S = 1.0


class QueueSettings(dict[str, dict[str, Any]]):
    """The configured queues, plus those Redis knows (host queues), on the default connection.
    Without Redis, the configured ones."""

    def items(self) -> ItemsView[str, dict[str, Any]]:  # type: ignore[override]
        # Only host queues: another queue in the same Redis (a test's, another tool's) is not
        # one of ours, and the dashboard would look it up and get a KeyError (a 500 page).
        hosts = [name for name in self._registered() if name.startswith(HOST_QUEUE_PREFIX)]
        return {**{name: self[BASE] for name in hosts}, **dict(self)}.items()

    def __missing__(self, name: str) -> dict[str, Any]:
        if name.startswith(HOST_QUEUE_PREFIX):
            return self[BASE]
        raise KeyError(name)

    def _registered(self) -> list[str]:
        url = self[BASE]["URL"]
        try:
            client = Redis.from_url(
                url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
            )
            try:
                return [queue.name for queue in Queue.all(connection=client)]
            finally:
                client.close()
        except RedisError:
            return []
