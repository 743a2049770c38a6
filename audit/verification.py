"""Verifying the stored chain (the command, the job and the review page use this).

The chain is walked from its start: sequence 1, or — after ``prune_audit`` — the event after
the newest *sanctioned* prune (an ``AuditPrune`` row, which on PostgreSQL only the privileged
``berth_audit_prune()`` function can write; an ``audit.pruned`` event alone proves nothing,
anyone who can append could forge one). With anchors on (``audit.anchors``), the chain is also
compared with the latest signed anchor: events it names that are gone, a head or tail cut off,
or rows it says were pruned, are reported, with how many events were expected and found.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.utils import timezone
from redis.exceptions import RedisError
from rq.exceptions import NoSuchJobError
from rq.job import Job

from audit import anchors, chain
from audit.actions import Action, Outcome
from audit.anchors import Anchor, AnchorError
from audit.models import AuditEvent, AuditPrune
from audit.trail import record
from core.queues import redis_connection

CHUNK = 2000


@dataclass(frozen=True)
class Checkpoint:
    """Where a pruned chain starts: events up to ``through_seq`` were removed deliberately."""

    through_seq: int
    through_hash: str
    recorded_seq: int


def current_checkpoint(using: str = DEFAULT_DB_ALIAS) -> Checkpoint | None:
    """The sanctioned prune the stored chain starts after, or None if it starts at sequence 1
    (or its head is missing without a prune that explains it)."""
    first = AuditEvent.objects.using(using).order_by("seq").values_list("seq", flat=True).first()
    if first is None or first == 1:
        return None
    prune = AuditPrune.objects.using(using).filter(through_seq=first - 1).first()
    if prune is None:
        return None
    return Checkpoint(prune.through_seq, prune.through_hash, prune.checkpoint_seq)


def verify_stored_chain(using: str = DEFAULT_DB_ALIAS) -> chain.Verification:
    """Recompute every hash in sequence order from the start (read in chunks so a million rows
    stay cheap), then compare with the latest anchor; ``expected``/``found`` are always set."""
    checkpoint = current_checkpoint(using)
    start_seq, start_hash = (
        (checkpoint.through_seq + 1, checkpoint.through_hash)
        if checkpoint
        else (1, chain.GENESIS_HASH)
    )
    try:
        anchor = anchors.latest_anchor()
    except AnchorError as exc:
        return _counted(chain.Verification(0, 0, start_seq, str(exc)), start_seq, None, using)
    if anchor is not None:
        start_seq, start_hash = anchor.first_seq, anchor.start_hash
    result = chain.verify(_rows(using, start_seq), start_seq=start_seq, start_hash=start_hash)
    if result.ok and anchor is not None:
        result = _against_anchor(result, anchor, using)
    return _counted(result, start_seq, anchor, using)


def verify_since_anchor(anchor: Anchor | None, using: str = DEFAULT_DB_ALIAS) -> chain.Verification:
    """Whether the chain still holds ``anchor`` and links on from it: only the events after
    the anchor are re-hashed (the whole chain when there is no anchor yet)."""
    if anchor is None:
        return verify_stored_chain(using)
    events = AuditEvent.objects.using(using)
    head = events.order_by("seq").values_list("seq", "prev_hash").first()
    held = events.filter(seq=anchor.last_seq).values_list("hash", flat=True).first()
    stored = events.filter(seq__gte=anchor.first_seq, seq__lte=anchor.last_seq).count()
    if (
        head != (anchor.first_seq, anchor.start_hash)
        or held != anchor.last_hash
        or (stored != anchor.count)
    ):
        return verify_stored_chain(using)  # it names what differs
    result = chain.verify(
        _rows(using, anchor.last_seq + 1),
        start_seq=anchor.last_seq + 1,
        start_hash=anchor.last_hash,
    )
    return dataclasses.replace(result, checked=result.checked + anchor.count)


def anchor_chain(*, reason: str, using: str = DEFAULT_DB_ALIAS) -> Anchor | None:
    """Check the chain against the latest anchor, then write a new one. Raises
    :class:`AnchorError` rather than anchoring a chain that does not match: an anchor must
    never bless tampering. None when anchors are off."""
    if not anchors.enabled():
        return None
    result = verify_since_anchor(anchors.latest_anchor(), using)
    if not result.ok:
        raise AnchorError(
            f"not anchored: the audit chain is broken at sequence {result.first_bad_seq} "
            f"({result.reason})"
        )
    return anchors.write_anchor(
        reason=reason, using=using, verified_through=_reached(result, using)
    )


def _reached(result: chain.Verification, using: str) -> tuple[int, str]:
    held = (
        AuditEvent.objects.using(using).filter(seq=result.last_seq).values_list("hash", flat=True)
    )
    return result.last_seq, held.first() or chain.GENESIS_HASH


def _rows(using: str, start_seq: int):  # type: ignore[no-untyped-def]
    return (
        AuditEvent.objects.using(using)
        .filter(seq__gte=start_seq)
        .order_by("seq")
        .values("seq", "prev_hash", "hash", *chain.HASHED_FIELDS)
        .iterator(chunk_size=CHUNK)
    )


def _against_anchor(result: chain.Verification, anchor: Anchor, using: str) -> chain.Verification:
    """An intact walk can still have lost its tail, or hold another chain than the anchor."""
    if result.last_seq < anchor.last_seq:
        return dataclasses.replace(
            result,
            first_bad_seq=result.last_seq + 1,
            reason=f"the latest anchor ({anchor.time}) ends at sequence {anchor.last_seq}, "
            f"the stored chain at {result.last_seq}: its newest events are gone",
        )
    held = (
        AuditEvent.objects.using(using).filter(seq=anchor.last_seq).values_list("hash", flat=True)
    )
    if held.first() != anchor.last_hash:
        return dataclasses.replace(
            result,
            first_bad_seq=anchor.last_seq,
            reason=f"sequence {anchor.last_seq} is not the event the latest anchor "
            f"({anchor.time}) signed: the chain was rewritten",
        )
    return result


def _counted(
    result: chain.Verification, start_seq: int, anchor: Anchor | None, using: str
) -> chain.Verification:
    """Add expected against found, the missing ranges and the rows that should be gone."""
    events = AuditEvent.objects.using(using)
    found = events.count()
    newest = events.order_by("-seq").values_list("seq", flat=True).first() or 0
    last = max(newest, anchor.last_seq if anchor else 0)
    expected = max(last - start_seq + 1, 0)
    extra = events.filter(seq__lt=start_seq).count()
    missing = _missing_ranges(using, start_seq, last) if found - extra != expected else ()
    if extra and result.ok:
        result = dataclasses.replace(
            result,
            first_bad_seq=start_seq - 1,
            reason=f"{extra} events before sequence {start_seq} are still stored although the "
            f"latest anchor says they were pruned",
        )
    if missing and result.first_bad_seq != missing[0][0] and anchor is not None:
        result = dataclasses.replace(
            result,
            first_bad_seq=missing[0][0],
            reason=f"events {_ranges_text(missing)} are missing: the latest anchor "
            f"({anchor.time}) holds them",
        )
    elif missing and anchor is not None and "anchor" not in result.reason:
        result = dataclasses.replace(
            result, reason=f"{result.reason}; the latest anchor ({anchor.time}) holds them"
        )
    return dataclasses.replace(result, expected=expected, found=found, missing=missing, extra=extra)


def _missing_ranges(using: str, start_seq: int, last_seq: int) -> tuple[tuple[int, int], ...]:
    """Sequence ranges in ``start_seq..last_seq`` with no stored event (one window query)."""
    table = connections[using].ops.quote_name(AuditEvent._meta.db_table)
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"SELECT prior + 1, seq - 1 FROM (SELECT seq, LAG(seq) OVER (ORDER BY seq) AS prior "  # noqa: S608
            f"FROM {table} WHERE seq >= %s) AS runs WHERE seq - prior > 1",
            [start_seq],
        )
        gaps = [tuple(row) for row in cursor.fetchall()]
        cursor.execute(f"SELECT MIN(seq), MAX(seq) FROM {table} WHERE seq >= %s", [start_seq])  # noqa: S608
        low, high = cursor.fetchone()
    if low is None:
        return ((start_seq, last_seq),) if last_seq >= start_seq else ()
    head = [(start_seq, low - 1)] if low > start_seq else []
    tail = [(high + 1, last_seq)] if high < last_seq else []
    return tuple(head + gaps + tail)


def _ranges_text(ranges: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(f"{low}" if low == high else f"{low}-{high}" for low, high in ranges[:10])


def verify_and_record(
    using: str = DEFAULT_DB_ALIAS, *, scheduled: bool = False
) -> chain.Verification:
    """Verify, append the result to the trail itself (a broken chain is ``failed``) and, when
    it is intact and anchors are on, anchor the chain as it now stands."""
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
        expected=result.expected,
        found=result.found,
        missing=[list(pair) for pair in result.missing[:20]],
        scheduled=scheduled,
    )
    if result.ok:
        anchors.write_anchor(
            reason="scheduled" if scheduled else "verified",
            using=using,
            verified_through=_reached(result, using),
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


def job_state(job_id: str) -> str:
    """What RQ says of a verification job: ``queued``, ``started``, ``finished``, ``failed``…,
    ``gone`` when Redis no longer knows it, ``unknown`` when Redis does not answer."""
    if not job_id:
        return "gone"
    try:
        status = Job.fetch(job_id, connection=redis_connection()).get_status()
    except NoSuchJobError:
        return "gone"
    except RedisError:
        return "unknown"
    return getattr(status, "value", str(status))  # RQ's JobStatus enum
