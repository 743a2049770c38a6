"""The audit trail's own jobs: verifying the chain, on request and on a schedule::

job_id = enqueue(get_queue(DEFAULT_QUEUE), "audit.jobs.verify_chain")
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from rq import Queue

from core.queues import META_KEY, get_queue


def verify_chain(*, scheduled: bool = False) -> dict[str, Any]:
    """Walk the whole audit chain and record the result as ``audit.verified``. A scheduled run
    books the next one (every ``BERTH_AUDIT_VERIFY_INTERVAL_H`` hours), also when it fails."""
    from audit.verification import verify_and_record

    try:
        result = verify_and_record(scheduled=scheduled)
    finally:
        if scheduled:
            schedule_verification(get_queue("default"))
    return {"ok": result.ok, "checked": result.checked, "first_bad_seq": result.first_bad_seq}


SCHEDULED_VERIFY_PREFIX = "audit-verify-at-"
# A console that was never verified (or not for a whole interval) is verified this soon after
# its default worker starts.
FIRST_RUN_DELAY = timedelta(minutes=1)


def schedule_verification(queue: Queue, *, delay: timedelta | None = None) -> str | None:
    """Book the next periodic chain verification on ``queue`` unless one is already booked.

    The default worker calls this when it starts (``berth_worker default --with-scheduler``),
    and each scheduled run calls it again, so exactly one run is pending at any time. The job
    id names the hour it is due, so two workers starting together book the same job once.
    None when ``BERTH_AUDIT_VERIFY_INTERVAL_H`` is 0 (verification on request only).
    """
    hours = settings.BERTH_AUDIT_VERIFY_INTERVAL_H
    if not hours:
        return None
    for job_id in queue.scheduled_job_registry.get_job_ids():
        if job_id.startswith(SCHEDULED_VERIFY_PREFIX):
            return job_id
    now = datetime.now(UTC)
    if delay is None:
        # Due one interval after the last recorded verification (soon if there was none).
        from audit.verification import latest_status

        last = latest_status().time
        due = max(last + timedelta(hours=hours) if last else now, now + FIRST_RUN_DELAY)
    else:
        due = now + delay
    job_id = f"{SCHEDULED_VERIFY_PREFIX}{due:%Y%m%dT%H}"
    queue.enqueue_at(
        due,
        "audit.jobs.verify_chain",
        scheduled=True,
        job_id=job_id,
        job_timeout=3600,
        meta={META_KEY: {}},  # the system acts, not whoever happened to start the worker
    )
    return job_id
