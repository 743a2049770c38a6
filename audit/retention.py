"""Removing old audit events (``manage.py prune_audit``), without breaking verification.

Audit events are kept forever unless ``BERTH_AUDIT_RETENTION_DAYS`` is set (or ``--force`` is
given). A prune runs in one transaction:

1. verify the chain as it stands (a broken chain is evidence: it is not pruned);
2. record ``audit.pruned`` — the checkpoint: the ``seq`` and ``hash`` of the last event to be
   removed, the cutoff and the count;
3. on PostgreSQL, call ``berth_audit_prune(through_seq, checkpoint_seq)``: a SECURITY DEFINER
   function owned by the schema's owner (migration 0007), which only the role an operator
   grants it to may run (``berth_pruner``, see the README), never the application's. It
   checks that the checkpoint is the newest event, names exactly that event and hash, and that
   the chain links from its start to the checkpoint; then it records the prune in
   ``audit_auditprune`` and deletes the rows — the append-only trigger lets a DELETE through
   only inside that function. On SQLite (one file, no roles) the same happens here.

Then, with anchors on, a new signed anchor records where the chain now starts, so verification
tells this prune from an erasure.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, transaction

from audit import anchors
from audit.actions import Action
from audit.models import AuditEvent, AuditPrune
from audit.trail import lock_chain, record
from audit.verification import verify_stored_chain

INSUFFICIENT_PRIVILEGE = "42501"


class PruneRefused(Exception):
    """The prune would lose evidence or was not asked for properly; the message says why."""


@dataclass(frozen=True)
class PruneResult:
    deleted: int
    through_seq: int | None
    checkpoint_seq: int | None


def prune_before(cutoff: datetime, *, using: str = DEFAULT_DB_ALIAS, **why: object) -> PruneResult:
    """Delete every audit event older than ``cutoff`` (``time < cutoff``), checkpointing first."""
    with transaction.atomic(using=using):
        lock_chain(using)
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
        deleted = _delete_head(using, through_seq, through_hash, checkpoint.seq, count)
    anchors.write_anchor(
        reason="prune", using=using, verified_through=(checkpoint.seq, checkpoint.hash)
    )
    return PruneResult(deleted, through_seq, checkpoint.seq)


def _delete_head(
    using: str, through_seq: int, through_hash: str, checkpoint_seq: int, count: int
) -> int:
    connection = connections[using]
    if connection.vendor != "postgresql":
        table = connection.ops.quote_name(AuditEvent._meta.db_table)
        with connection.cursor() as cursor:
            cursor.execute(f"DELETE FROM {table} WHERE seq <= %s", [through_seq])  # noqa: S608
            deleted = cursor.rowcount
        AuditPrune.objects.using(using).create(
            through_seq=through_seq,
            through_hash=through_hash,
            checkpoint_seq=checkpoint_seq,
            deleted=count,
        )
        return deleted
    try:
        with transaction.atomic(using=using), connection.cursor() as cursor:
            cursor.execute("SELECT berth_audit_prune(%s, %s)", [through_seq, checkpoint_seq])
            return cursor.fetchone()[0]
    except DatabaseError as exc:
        if getattr(exc.__cause__, "sqlstate", None) != INSUFFICIENT_PRIVILEGE:
            raise
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_user")
            role = cursor.fetchone()[0]
    raise PruneRefused(
        f"the database role {role} may not prune the audit trail: run prune_audit with the "
        "DATABASE_URL of the role granted EXECUTE on berth_audit_prune() (berth_pruner in the "
        "README), not the application's"
    )
