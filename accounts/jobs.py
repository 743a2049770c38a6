"""Periodic jobs of accounts (run by the host agents through ``core.periodic``)."""

from __future__ import annotations

from accounts import keys
from core.periodic import Scope, system_job

EXPIRY_CHECK_EVERY_S = 60


@system_job(every=EXPIRY_CHECK_EVERY_S, scope=Scope.CONSOLE)
def audit_expired_keys() -> dict[str, int]:
    """Audit each API key that passed its expiry, once (gateways refuse it from that second on
    regardless; this writes the ``apikey.expired`` event and tells the gateways to reload)."""
    return {"expired": keys.record_expired()}
