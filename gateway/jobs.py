"""Periodic jobs of the gateway (run by the host agents through ``core.periodic``)."""

from __future__ import annotations

from core.periodic import Scope, system_job
from gateway import usage

PRUNE_EVERY_S = 3600


@system_job(every=PRUNE_EVERY_S, scope=Scope.CONSOLE)
def prune_usage() -> dict[str, int]:
    """Remove per-minute usage rows older than ``BERTH_GATEWAY_USAGE_RETENTION_D``."""
    return {"deleted": usage.prune()}
