"""The hash chain: canonical JSON of an event, its SHA-256, and verification of a sequence.

``hash = SHA-256(prev_hash + "\\n" + canonical_json(fields))`` where ``fields`` are the event's
stored values with sorted keys, compact separators and UTC microsecond timestamps. The actor and
team foreign keys are not hashed (deleting a user sets them to NULL); the copied names are.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

GENESIS_HASH = "0" * 64

HASHED_FIELDS = (
    "seq",
    "time",
    "actor_name",
    "actor_kind",
    "team_slug",
    "action",
    "target_type",
    "target_id",
    "target_repr",
    "request_id",
    "job_id",
    "client_ip",
    "outcome",
    "payload_json",
)


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, no NaN or infinities."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def canonical_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def event_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    """The chained hash of one event's hashed fields."""
    document = {name: fields[name] for name in HASHED_FIELDS}
    document["time"] = canonical_time(document["time"])
    digest = hashlib.sha256()
    digest.update(prev_hash.encode("ascii"))
    digest.update(b"\n")
    digest.update(canonical_json(document).encode("utf-8"))
    return digest.hexdigest()


@dataclass(frozen=True)
class Verification:
    """The result of walking the chain: ``first_bad_seq`` is None when it is intact."""

    checked: int
    last_seq: int
    first_bad_seq: int | None = None
    reason: str = ""
    # Filled by ``audit.verification``: events the chain (and its latest anchor) say should be
    # stored against those that are, the missing sequence ranges, and rows that should be gone.
    expected: int | None = None
    found: int | None = None
    missing: tuple[tuple[int, int], ...] = ()
    extra: int = 0

    @property
    def ok(self) -> bool:
        return self.first_bad_seq is None


def verify(
    rows: Iterable[Mapping[str, Any]], *, start_seq: int = 1, start_hash: str = GENESIS_HASH
) -> Verification:
    """Walk rows in ``seq`` order and report the first sequence number that breaks the chain:
    a gap (a deleted row), a ``prev_hash`` that does not link, or a hash that does not match
    the row's contents (an edited row)."""
    expected_seq, prev_hash, checked = start_seq, start_hash, 0
    for row in rows:
        seq = row["seq"]
        if seq != expected_seq:
            return Verification(
                checked,
                expected_seq - 1,
                expected_seq,
                f"sequence {expected_seq} is missing: the row after {expected_seq - 1} is {seq}",
            )
        if row["prev_hash"] != prev_hash:
            return Verification(
                checked,
                seq - 1,
                seq,
                f"sequence {seq} does not link to its predecessor (prev_hash differs)",
            )
        if event_hash(prev_hash, row) != row["hash"]:
            return Verification(
                checked,
                seq - 1,
                seq,
                f"sequence {seq} was altered: its contents no longer match its hash",
            )
        prev_hash, expected_seq, checked = row["hash"], seq + 1, checked + 1
    return Verification(checked, expected_seq - 1)
