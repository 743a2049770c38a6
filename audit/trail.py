"""Writing to the audit trail: ``record()`` and ``audited_transaction()``.

Use the package-level names::

    import audit
    from audit.actions import Action, Outcome

    audit.record(Action.MODEL_REGISTERED, target=model, path=model.path)
    with audit.audited_transaction(Action.DEPLOYMENT_LAUNCH_REQUESTED, target=deployment):
        ...   # on an exception: rolled back, then recorded with outcome "failed", then re-raised

Lock order (PostgreSQL; SQLite serializes every write transaction with BEGIN IMMEDIATE):

1. **the chain lock first.** A transaction that will record takes the chain lock (an advisory
   lock held to the end of the transaction) before it locks or writes any row:
   ``with chain_transaction():`` or ``lock_chain()`` as its first statement. ``record()``
   inside it takes the lock it already holds again, which costs nothing.
2. then rows, in this order: team, host, GPUs (by primary key), deployment, allocations.
3. a row lock that only guards a count (a team's GPU quota) is ``FOR NO KEY UPDATE``: the
   ``KEY SHARE`` lock an audit row's team foreign key takes does not wait for it.

Why: an append holds the chain lock to the end of its transaction, and inserting the audit row
locks its team row (``KEY SHARE``). A transaction that first locked rows and only then records
waits for the chain lock while holding them; if the chain lock's holder needs one of those rows,
PostgreSQL kills one of the two as a deadlock (``reserve()`` locking the team, then recording,
against any append for that team did exactly that). Whatever still collides — work that takes
no chain lock — is retried as a whole (``core.contention.retrying``, and every job by
``ContextJob``); a request whose retries run out answers 503 with ``Retry-After``, audited.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, models, transaction
from django.utils import timezone

from audit import chain
from audit.actions import Action, Outcome
from audit.models import AuditEvent
from core import context

# Key of the PostgreSQL advisory lock that serializes appends (arbitrary, fixed: "berthaud").
CHAIN_LOCK_KEY = 0x6265727468617564
MAX_REPR = 200
MAX_ERROR = 1000


@dataclass(frozen=True)
class Target:
    """A target that is not a model instance (a host path, a queue, a container)."""

    type: str
    id: str
    repr: str = ""


def record(
    action: Action | str,
    *,
    target: models.Model | Target | None = None,
    outcome: Outcome | str = Outcome.OK,
    team: models.Model | None = None,
    actor: Any = None,
    using: str = DEFAULT_DB_ALIAS,
    **data: Any,
) -> AuditEvent:
    """Append one event to the chain and return it.

    The actor, request id, job id and client address come from the audit context unless
    ``actor`` (a user) is given. ``team`` defaults to the target's team. ``data`` becomes the
    JSON payload and must hold JSON-native values only (no NaN, no objects).
    The append takes the chain lock, so it is atomic with the caller's transaction.
    """
    action = _checked_action(action)
    outcome = Outcome(outcome)
    payload_json = _payload_json(data)
    ctx = context.current()
    who = _actor(actor)
    team = team if team is not None else getattr(target, "team", None)
    event = AuditEvent(
        actor_id=who.user_id,
        actor_name=who.name[:150],
        actor_kind=who.kind,
        team=team,
        team_slug=getattr(team, "slug", "") or "",
        action=action.value,
        outcome=outcome.value,
        request_id=ctx.request_id or "",
        job_id=ctx.job_id or "",
        client_ip=ctx.client_ip or "",
        payload_json=payload_json,
        **_target_fields(target),
    )
    with transaction.atomic(using=using):
        lock_chain(using)
        last = (
            AuditEvent.objects.using(using)
            .order_by("-seq")
            .values_list("seq", "hash", "time")
            .first()
        )
        last_seq, prev_hash, last_time = last or (0, chain.GENESIS_HASH, None)
        # Stamped under the lock and never earlier than the previous event, so time does not
        # decrease along the chain (a time range maps to one range of ``seq``: audit.filters).
        now = timezone.now()
        event.time = max(now, last_time) if last_time is not None else now
        event.seq = last_seq + 1
        event.prev_hash = prev_hash
        event.hash = chain.event_hash(prev_hash, _hashed_values(event))
        event.save(using=using)
    return event


@contextmanager
def audited_transaction(
    action: Action | str, *, target: models.Model | Target | None = None, **data: Any
) -> Iterator[None]:
    """Run the block in its own (outermost) transaction. If it raises, the block's writes roll
    back, ``action`` is recorded with outcome ``failed`` and the error, and the exception
    propagates. ``durable=True`` guarantees the failure record cannot itself be rolled back by
    an enclosing transaction."""
    try:
        with transaction.atomic(durable=True):
            yield
    except Exception as exc:
        record(action, target=target, outcome=Outcome.FAILED, error=_error_text(exc), **data)
        raise


def denial_reason(exc: Exception) -> str:
    """A refusal as one line for the payload of an outcome-``denied`` event: each field of a
    ``ValidationError`` with its messages, or the exception's text."""
    messages = getattr(exc, "message_dict", None)
    if messages:
        return "; ".join(f"{field}: {' '.join(texts)}" for field, texts in messages.items())
    return str(exc)


def _checked_action(action: Action | str) -> Action:
    try:
        return Action(action)
    except ValueError:
        raise ValueError(
            f"unknown audit action {action!r}: add it to audit.actions.Action first"
        ) from None


def _payload_json(data: dict[str, Any]) -> str:
    try:
        text = chain.canonical_json(data)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"audit payload must be JSON-native (str, int, float, bool, None, list, dict): {exc}"
        ) from None
    # Round-trip once so what is hashed is exactly what reading the row back yields.
    return chain.canonical_json(json.loads(text))


def _actor(user: Any) -> context.Actor:
    if user is None:
        return context.resolve_actor()
    kind = context.current().actor_kind if context.current().job_id else context.ACTOR_USER
    return context.Actor(user.pk, user.get_username(), getattr(user, "actor_kind", kind))


def _target_fields(target: models.Model | Target | None) -> dict[str, str]:
    if target is None:
        return {"target_type": "", "target_id": "", "target_repr": ""}
    if isinstance(target, Target):
        return {
            "target_type": target.type,
            "target_id": str(target.id),
            "target_repr": target.repr[:MAX_REPR],
        }
    return {
        "target_type": target._meta.label_lower,
        "target_id": str(target.pk),
        "target_repr": str(target)[:MAX_REPR],
    }


def _hashed_values(event: AuditEvent) -> dict[str, Any]:
    return {name: getattr(event, name) for name in chain.HASHED_FIELDS}


@contextmanager
def chain_transaction(using: str = DEFAULT_DB_ALIAS) -> Iterator[None]:
    """``transaction.atomic()`` whose first statement takes the chain lock (see the lock order
    above): for a transaction that writes rows and records."""
    with transaction.atomic(using=using):
        lock_chain(using)
        yield


def lock_chain(using: str = DEFAULT_DB_ALIAS) -> None:
    connection = connections[using]
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [CHAIN_LOCK_KEY])
    # SQLite: every transaction is BEGIN IMMEDIATE (settings), which already holds the single
    # write lock for the rest of the transaction, so appends cannot interleave.


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR]
