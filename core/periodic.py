"""The one registry of periodic jobs. Each app declares its own in its ``jobs`` module, which its
``AppConfig.ready()`` imports; the host agent (``agent.scheduler``) runs what the registry holds
and knows nothing of what the jobs do::

    @system_job(every=lambda: settings.BERTH_RECONCILE_INTERVAL_S, scope=Scope.HOST)
    def reconcile_job(host_pk: int) -> dict: ...

A ``host`` job runs once per host, on that host's queue, with the host's primary key; a
``console`` job runs once for the whole console on the default queue, whichever agent claims
the interval first (a Redis key that expires with the interval).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from django.conf import settings

from core import naming
from core.queues import redis_connection


class Scope(StrEnum):
    HOST = "host"
    CONSOLE = "console"


@dataclass(frozen=True)
class SystemJob:
    """A job the agent runs every ``interval_s()`` seconds (read each time, so settings apply
    without a restart; 0 turns the job off). The first run is due ``first_after_s`` seconds
    after the agent starts, or one interval later when None (garbage collection lets engines
    settle first)."""

    func: Callable[..., Any]
    interval_s: Callable[[], float]
    scope: Scope
    first_after_s: float | None = 0.0
    timeout_s: int = 3600

    @property
    def name(self) -> str:
        return f"{self.func.__module__}.{self.func.__qualname__}"


_registry: dict[str, SystemJob] = {}


def system_job(
    *,
    every: float | Callable[[], float],
    scope: Scope,
    first_after_s: float | None = 0.0,
    timeout_s: int = 3600,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as a periodic job; the function itself is unchanged."""
    interval_s = every if callable(every) else (lambda: every)

    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        job = SystemJob(func, interval_s, scope, first_after_s, timeout_s)
        _registry[job.name] = job
        return func

    return register


def registered(scope: Scope | None = None) -> tuple[SystemJob, ...]:
    """The registered jobs (of one scope), in a stable order."""
    jobs = sorted(_registry.values(), key=lambda job: job.name)
    return tuple(job for job in jobs if scope is None or job.scope is scope)


def claim(name: str, interval_s: float, scope_key: str = "") -> bool:
    """Claim this interval's run of the periodic work ``name`` for the calling process: True for
    the first caller, False for every other one until the interval has passed."""
    key = naming.periodic_claim_key(name, settings.BERTH_INSTANCE, scope_key)
    return bool(redis_connection().set(key, "1", nx=True, ex=max(int(interval_s), 1)))


def unclaim(name: str, scope_key: str = "") -> None:
    """Give back this interval's claim (the run could not be enqueued), so the next tick of any
    agent claims it again instead of the work being skipped for a whole interval."""
    redis_connection().delete(naming.periodic_claim_key(name, settings.BERTH_INSTANCE, scope_key))
