"""The audit trail's own jobs: verifying the chain on request, and every
``BERTH_AUDIT_VERIFY_INTERVAL_H`` hours through the periodic-job registry::

    job_id = enqueue(get_queue(DEFAULT_QUEUE), verify_chain)
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone

from audit import anchors
from audit.verification import anchor_chain, latest_status, verify_and_record
from core.periodic import Scope, system_job


def verify_chain(*, scheduled: bool = False) -> dict[str, Any]:
    """Walk the whole audit chain and record the result as ``audit.verified``."""
    result = verify_and_record(scheduled=scheduled)
    return {"ok": result.ok, "checked": result.checked, "first_bad_seq": result.first_bad_seq}


FIRST_RUN_AFTER_S = 60


def _verify_interval_s() -> float:
    return settings.BERTH_AUDIT_VERIFY_INTERVAL_H * 3600


# Not at the very start: a console that was just started is busy migrating and launching.
@system_job(every=_verify_interval_s, scope=Scope.CONSOLE, first_after_s=FIRST_RUN_AFTER_S)
def scheduled_verification(now: datetime | None = None) -> dict[str, Any] | None:
    """The periodic verification. Skipped when the chain was verified less than half an interval
    ago (a verification on request, or a run booked again after Redis lost its claim)."""
    last = latest_status().time
    since = (now or timezone.now()) - last if last is not None else None
    if since is not None and since < timedelta(seconds=_verify_interval_s() / 2):
        return None
    return verify_chain(scheduled=True)


ANCHOR_EVERY_S = 3600.0


def _anchor_interval_s() -> float:
    return ANCHOR_EVERY_S if anchors.enabled() else 0.0


@system_job(every=_anchor_interval_s, scope=Scope.CONSOLE, first_after_s=FIRST_RUN_AFTER_S)
def scheduled_anchor() -> dict[str, Any] | None:
    """An hourly signed anchor of the chain outside the database (``audit.anchors``), written by
    the console's default worker — the one that holds the key; agents only book it."""
    anchor = anchor_chain(reason="scheduled")
    return None if anchor is None else {"last_seq": anchor.last_seq, "count": anchor.count}
