"""Verifying the stored chain (the command, the job and the review page use this)."""

from __future__ import annotations

from audit import chain
from audit.actions import Action, Outcome
from audit.models import AuditEvent

CHUNK = 2000


def verify_stored_chain(using: str = "default") -> chain.Verification:
    """Recompute every hash in sequence order; read in chunks so a million rows stay cheap."""
    rows = (
        AuditEvent.objects.using(using)
        .order_by("seq")
        .values("seq", "prev_hash", "hash", *chain.HASHED_FIELDS)
        .iterator(chunk_size=CHUNK)
    )
    return chain.verify(rows)


def verify_and_record(using: str = "default") -> chain.Verification:
    """Verify, then append the result to the trail itself (a broken chain is ``failed``)."""
    from audit.trail import record

    result = verify_stored_chain(using)
    record(
        Action.AUDIT_VERIFIED,
        outcome=Outcome.OK if result.ok else Outcome.FAILED,
        using=using,
        checked=result.checked,
        last_seq=result.last_seq,
        first_bad_seq=result.first_bad_seq,
        reason=result.reason,
    )
    return result
