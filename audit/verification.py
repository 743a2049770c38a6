"""Verifying the stored chain (the command, the job and the review page use this).

After ``prune_audit`` removed the oldest events, the chain starts at a checkpoint: the
``audit.pruned`` event recorded just before the delete names the last removed event's ``seq``
and ``hash``, and verification starts from there instead of reporting the missing head as
tampering. Without such a checkpoint a missing head is reported like any other gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from audit import chain
from audit.actions import Action, Outcome
from audit.models import AuditEvent

CHUNK = 2000
# How many of the newest prune checkpoints are looked at to find the one the chain starts at.
CHECKPOINTS_SCANNED = 20


@dataclass(frozen=True)
class Checkpoint:
    """Where a pruned chain starts: events up to ``through_seq`` were removed deliberately."""

    through_seq: int
    through_hash: str
    recorded_seq: int


def current_checkpoint(using: str = "default") -> Checkpoint | None:
    """The checkpoint the stored chain starts from, or None if it starts at sequence 1 (or its
    head is missing without a checkpoint that explains it)."""
    first = AuditEvent.objects.using(using).order_by("seq").values_list("seq", flat=True).first()
    if first is None or first == 1:
        return None
    candidates = (
        AuditEvent.objects.using(using)
        .filter(action=Action.AUDIT_PRUNED, outcome=Outcome.OK)
        .order_by("-seq")[:CHECKPOINTS_SCANNED]
    )
    for event in candidates:
        payload = event.payload
        if payload.get("through_seq") == first - 1 and isinstance(payload.get("through_hash"), str):
            return Checkpoint(first - 1, payload["through_hash"], event.seq)
    return None


def verify_stored_chain(using: str = "default") -> chain.Verification:
    """Recompute every hash in sequence order from the start (or the prune checkpoint); read in
    chunks so a million rows stay cheap."""
    checkpoint = current_checkpoint(using)
    rows = (
        AuditEvent.objects.using(using)
        .order_by("seq")
        .values("seq", "prev_hash", "hash", *chain.HASHED_FIELDS)
        .iterator(chunk_size=CHUNK)
    )
    if checkpoint is None:
        return chain.verify(rows)
    return chain.verify(
        rows, start_seq=checkpoint.through_seq + 1, start_hash=checkpoint.through_hash
    )


def verify_and_record(using: str = "default", *, scheduled: bool = False) -> chain.Verification:
    """Verify, then append the result to the trail itself (a broken chain is ``failed``)."""
    from audit.trail import record

    checkpoint = current_checkpoint(using)
    result = verify_stored_chain(using)
    record(
        Action.AUDIT_VERIFIED,
        outcome=Outcome.OK if result.ok else Outcome.FAILED,
        using=using,
        checked=result.checked,
        first_seq=checkpoint.through_seq + 1 if checkpoint else 1,
        last_seq=result.last_seq,
        first_bad_seq=result.first_bad_seq,
        reason=result.reason,
        scheduled=scheduled,
    )
    return result


@dataclass(frozen=True)
class Status:
    """The latest recorded verification, for the badge on the review page."""

    state: str  # "verified", "broken", "stale" or "never"
    seq: int | None = None
    time: datetime | None = None
    checked: int | None = None
    last_seq: int | None = None
    first_bad_seq: int | None = None
    reason: str = ""

    @property
    def label(self) -> str:
        return {
            "verified": "Verified",
            "broken": "Broken",
            "stale": "Stale",
            "never": "Never verified",
        }[self.state]


def stale_after() -> timedelta:
    """A successful verification older than this is shown as stale: a day, or the scheduled
    interval if that is longer, plus an hour for the job to run."""
    hours = max(24, settings.BERTH_AUDIT_VERIFY_INTERVAL_H)
    return timedelta(hours=hours + 1)


def latest_status(now: datetime | None = None) -> Status:
    """One query on the (action, seq) index: the newest ``audit.verified`` event."""
    event = AuditEvent.objects.filter(action=Action.AUDIT_VERIFIED).order_by("-seq").first()
    if event is None:
        return Status("never")
    payload = event.payload
    if event.outcome != Outcome.OK:
        state = "broken"
    elif (now or timezone.now()) - event.time > stale_after():
        state = "stale"
    else:
        state = "verified"
    return Status(
        state,
        seq=event.seq,
        time=event.time,
        checked=payload.get("checked"),
        last_seq=payload.get("last_seq"),
        first_bad_seq=payload.get("first_bad_seq"),
        reason=payload.get("reason") or "",
    )
