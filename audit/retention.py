"""Removing old audit events (``manage.py prune_audit``), without breaking verification.

Audit events are kept forever unless ``BERTH_AUDIT_RETENTION_DAYS`` is set (or ``--force`` is
given). A prune runs in one transaction:

1. verify the chain as it stands (a broken chain is evidence: it is not pruned);
2. record ``audit.pruned`` — the checkpoint: the ``seq`` and ``hash`` of the last event to be
   removed, the cutoff and the count — so ``audit_verify`` starts from it afterwards;
3. delete the events up to that ``seq`` through the one escape the guards leave open: raw SQL
   past the ORM's refusal and, on PostgreSQL, ``SET LOCAL berth.audit_prune_through`` which the
   append-only trigger honours for rows at or below that ``seq`` only, for this transaction only,
   and only while the checkpoint of step 2 is in the table (migration 0005).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db import DEFAULT_DB_ALIAS, connections, transaction

from audit.actions import Action
from audit.models import AuditEvent
from audit.verification import verify_stored_chain


class PruneRefused(Exception):
    """The prune would lose evidence or was not asked for properly; the message says why."""


@dataclass(frozen=True)
class PruneResult:
    deleted: int
    through_seq: int | None
    checkpoint_seq: int | None


def prune_before(cutoff: datetime, *, using: str = DEFAULT_DB_ALIAS, **why: object) -> PruneResult:
    """Delete every audit event older than ``cutoff`` (``time < cutoff``), checkpointing first."""
    from audit.trail import _lock_chain, record

    with transaction.atomic(using=using):
        _lock_chain(using)
        events = AuditEvent.objects.using(using)
        # Time does not decrease along the chain, so "older than the cutoff" is a head of it.
        last = events.filter(time__lt=cutoff).order_by("-seq").values_list("seq", "hash").first()
        if last is None:
            return PruneResult(0, None, None)
        through_seq, through_hash = last
        if not events.filter(seq__gt=through_seq).exists():
            raise PruneRefused(
                "every audit event is older than the cutoff; at least the newest one must stay "
                "so the chain keeps a head (choose an earlier date)"
            )
        result = verify_stored_chain(using)
        if not result.ok:
            raise PruneRefused(
                f"the audit chain is broken at sequence {result.first_bad_seq} ({result.reason}); "
                "pruning would destroy the evidence — investigate first"
            )
        count = events.filter(seq__lte=through_seq).count()
        checkpoint = record(
            Action.AUDIT_PRUNED,
            using=using,
            through_seq=through_seq,
            through_hash=through_hash,
            deleted=count,
            cutoff=cutoff.isoformat(),
            **why,
        )
        connection = connections[using]
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute(
                    "SELECT set_config('berth.audit_prune_through', %s, true)", [str(through_seq)]
                )
            table = connection.ops.quote_name(AuditEvent._meta.db_table)
            cursor.execute(f"DELETE FROM {table} WHERE seq <= %s", [through_seq])  # noqa: S608
            deleted = cursor.rowcount
            if connection.vendor == "postgresql":
                cursor.execute("SELECT set_config('berth.audit_prune_through', '', true)")
    return PruneResult(deleted, through_seq, checkpoint.seq)
