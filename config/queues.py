"""The queues of the whole console. Built in :mod:`audit.jobs` (the bottom of the dependency
graph, so every app can enqueue); re-exported here for the project's own commands."""

from __future__ import annotations

from audit.jobs import get_queue, redis_connection

DEFAULT_QUEUE = "default"

__all__ = ["DEFAULT_QUEUE", "get_queue", "redis_connection"]
