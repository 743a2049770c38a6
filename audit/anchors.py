"""Anchors: signed digests of the audit chain kept outside the database.

Whoever can write the database (every host agent holds its credentials) could otherwise erase
or rewrite the chain and leave it verifying. An anchor records, at one moment, where the chain
starts (``first_seq`` and the hash it links to), its newest event (``last_seq``, ``last_hash``)
and how many events lie between, signed (HMAC-SHA256) with ``BERTH_AUDIT_ANCHOR_KEY`` — a key
only the console's web and default worker hold, never an agent — and written once into
``BERTH_AUDIT_ANCHOR_DIR``, a directory the database role cannot write (CloudTrail's digest
files are the model). Verification compares the chain with the latest anchor and names what is
missing or extra (``audit.verification``)::

    write_anchor(reason="verified")   # after a verification: the chain as it stands now
    latest_anchor()                    # the newest valid anchor, or None; AnchorError if forged

``audit.verification.anchor_chain`` checks the events since the latest anchor first.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, transaction
from django.utils import timezone

from audit import chain
from audit.models import AuditEvent
from audit.trail import lock_chain

VERSION = 1
PREFIX = "anchor-"
MIN_KEY_LENGTH = 32


class AnchorError(Exception):
    """Anchors are misconfigured, unreadable or forged; the message says which and the fix."""


@dataclass(frozen=True)
class Anchor:
    """The chain at one moment: events ``first_seq``..``last_seq`` (``count`` of them), the
    first linking to ``start_hash`` (the genesis hash, or the last pruned event's)."""

    first_seq: int
    start_hash: str
    last_seq: int
    last_hash: str
    count: int
    time: str
    reason: str
    version: int = VERSION

    def document(self) -> dict[str, Any]:
        return asdict(self)


def enabled() -> bool:
    return bool(settings.BERTH_AUDIT_ANCHOR_DIR)


def _directory() -> Path:
    directory = Path(settings.BERTH_AUDIT_ANCHOR_DIR)
    if not directory.is_dir():
        raise AnchorError(
            f"BERTH_AUDIT_ANCHOR_DIR={directory} is not a directory: create it, writable by the "
            "console's worker and not by the database's role"
        )
    return directory


def _key() -> bytes:
    key = settings.BERTH_AUDIT_ANCHOR_KEY
    if len(key) < MIN_KEY_LENGTH:
        raise AnchorError(
            "BERTH_AUDIT_ANCHOR_DIR is set but BERTH_AUDIT_ANCHOR_KEY is missing or shorter than "
            f"{MIN_KEY_LENGTH} characters: give the console's web and default worker a random key "
            "(never the agents)"
        )
    return key.encode()


def signature(document: dict[str, Any]) -> str:
    return hmac.new(_key(), chain.canonical_json(document).encode(), hashlib.sha256).hexdigest()


def current_state(using: str = DEFAULT_DB_ALIAS, *, reason: str) -> Anchor | None:
    """The chain as it stands (call under the chain lock for a consistent reading)."""
    events = AuditEvent.objects.using(using)
    first = events.order_by("seq").values_list("seq", "prev_hash").first()
    last = events.order_by("-seq").values_list("seq", "hash").first()
    if first is None or last is None:
        return None
    return Anchor(
        first_seq=first[0],
        start_hash=first[1],
        last_seq=last[0],
        last_hash=last[1],
        count=events.count(),
        time=chain.canonical_time(timezone.now()),
        reason=reason,
    )


def write_anchor(
    *,
    reason: str,
    using: str = DEFAULT_DB_ALIAS,
    verified_through: tuple[int, str] | None = None,
) -> Anchor | None:
    """Write the chain's current state as a new anchor file (never overwriting one) and return
    it; None when anchors are off or the chain is empty.

    ``verified_through`` is the (seq, hash) a verification just reached: the events appended
    since are re-hashed under the chain lock before anything is signed, so an anchor never
    covers an event nobody checked. Without it the caller vouches for the whole chain."""
    if not enabled():
        return None
    directory, _ = _directory(), _key()
    with transaction.atomic(using=using):
        lock_chain(using)
        if verified_through is not None:
            _check_tail(using, *verified_through)
        anchor = current_state(using, reason=reason)
    if anchor is None:
        return None
    document = anchor.document()
    document["signature"] = signature(anchor.document())
    moment = datetime.fromisoformat(anchor.time)
    path = directory / f"{PREFIX}{moment:%Y%m%dT%H%M%S%fZ}-{anchor.last_seq:012d}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(document, indent=1, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return anchor


def _check_tail(using: str, seq: int, hash_: str) -> None:
    rows = (
        AuditEvent.objects.using(using)
        .filter(seq__gt=seq)
        .order_by("seq")
        .values("seq", "prev_hash", "hash", *chain.HASHED_FIELDS)
    )
    result = chain.verify(rows, start_seq=seq + 1, start_hash=hash_)
    if not result.ok:
        raise AnchorError(
            f"not anchored: sequence {result.first_bad_seq} does not follow the verified chain "
            f"({result.reason})"
        )


def latest_anchor() -> Anchor | None:
    """The newest anchor (by the time in its name), its signature checked; None when anchors
    are off or none was written yet."""
    if not enabled():
        return None
    paths = sorted(_directory().glob(f"{PREFIX}*.json"))
    if not paths:
        return None
    return read_anchor(paths[-1])


def read_anchor(path: Path) -> Anchor:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        claimed = document.pop("signature")
        anchor = Anchor(**document)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise AnchorError(f"anchor {path.name} cannot be read: {exc}") from None
    if not hmac.compare_digest(claimed, signature(anchor.document())):
        raise AnchorError(
            f"anchor {path.name} does not carry a valid signature: it was edited, or written "
            "with another BERTH_AUDIT_ANCHOR_KEY"
        )
    return anchor
