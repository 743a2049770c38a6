"""Periodic jobs of the gateway (run by the host agents through ``core.periodic``)."""

from __future__ import annotations

from django.conf import settings

from core.periodic import Scope, system_job
from core.queues import redis_connection
from gateway import usage

PRUNE_EVERY_S = 3600


@system_job(every=PRUNE_EVERY_S, scope=Scope.CONSOLE)
def prune_usage() -> dict[str, int]:
    """Remove per-minute usage rows older than ``BERTH_GATEWAY_USAGE_RETENTION_D``, and the
    ids of stream entries that can no longer be handed out again."""
    return {
        "deleted": usage.prune(),
        "forgotten_entries": usage.prune_applied(redis_connection(), settings.BERTH_INSTANCE),
    }
