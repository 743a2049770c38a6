"""Usage off the hot path: one Redis stream entry per finished request, folded into minutes.

A gateway appends an entry when a request ends (``XADD``, one round trip, after the client has
its answer). Every gateway process also runs a consumer of the stream's group: it reads entries
in batches, adds them to the per-minute rows (``UsageMinute``) in one transaction, and only then
acknowledges them. An entry read by a consumer that died before acknowledging is claimed by
another one after ``CLAIM_IDLE_MS``, so a crashed gateway loses no finished request's usage.
Delivery is at least once, counting exactly once: the ids of the entries applied are written in
the same transaction as the rows (``AppliedEntry``), so an entry handed out again — its
consumer died between committing and acknowledging, or was only slow and lost it to a claim —
is acknowledged without being added twice. Old rows and ids are pruned by the periodic job in
``gateway.jobs``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone
from redis import Redis
from redis.exceptions import RedisError, ResponseError

from accounts.models import ApiKey, Team
from core import naming
from gateway.models import AppliedEntry, UsageMinute

logger = logging.getLogger(__name__)

GROUP = "aggregators"
STREAM_MAXLEN = 1_000_000  # approximate cap: days of traffic even if every consumer is down
BATCH = 1000
BLOCK_MS = 1000
CLAIM_IDLE_MS = 60_000
# Applied entry ids are kept this long, and longer while an older entry is still pending (read,
# not acknowledged): only a pending entry can be handed out again.
APPLIED_KEEP = timedelta(days=1)
REMEMBER_CHUNK = 500  # rows per INSERT (2 parameters each; far under SQLite's 32766)
COLUMNS = (
    "minute",
    "team_id",
    "key_prefix",
    "model",
    "deployment_id",
    "replica",
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms_sum",
    "ttft_ms_sum",
    "ttft_count",
)
IDENTITY = COLUMNS[:6]
SUMMED = COLUMNS[6:]


def stream_name(instance: str) -> str:
    return naming.gateway_key(instance, "usage")


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One finished request, as the stream carries it."""

    at: float  # Unix time the request arrived
    team_id: int
    key_prefix: str
    model: str
    deployment_id: int
    replica: int
    status: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    ttft_ms: float | None

    def fields(self) -> dict[str, str]:
        return {
            "at": f"{self.at:.3f}",
            "team": str(self.team_id),
            "key": self.key_prefix,
            "model": self.model,
            "deployment": str(self.deployment_id),
            "replica": str(self.replica),
            "status": str(self.status),
            "prompt": str(self.prompt_tokens),
            "completion": str(self.completion_tokens),
            "latency_ms": f"{self.latency_ms:.2f}",
            "ttft_ms": "" if self.ttft_ms is None else f"{self.ttft_ms:.2f}",
        }

    @classmethod
    def from_fields(cls, raw: dict[bytes, bytes]) -> UsageRecord:
        values = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            at=float(values["at"]),
            team_id=int(values["team"]),
            key_prefix=values["key"],
            model=values["model"],
            deployment_id=int(values["deployment"]),
            replica=int(values.get("replica") or 0),
            status=int(values["status"]),
            prompt_tokens=int(values["prompt"]),
            completion_tokens=int(values["completion"]),
            latency_ms=float(values["latency_ms"]),
            ttft_ms=float(values["ttft_ms"]) if values.get("ttft_ms") else None,
        )


def aggregate(records: Iterable[UsageRecord]) -> dict[tuple, list[float]]:
    """Sum records per (minute, team, key, model, deployment, replica). Pure."""
    sums: dict[tuple, list[float]] = defaultdict(lambda: [0] * len(SUMMED))
    for record in records:
        minute = datetime.fromtimestamp(record.at - record.at % 60, tz=UTC)
        row = sums[
            (
                minute,
                record.team_id,
                record.key_prefix,
                record.model,
                record.deployment_id,
                record.replica,
            )
        ]
        row[0] += 1
        row[1] += record.status >= 400
        row[2] += record.prompt_tokens
        row[3] += record.completion_tokens
        row[4] += record.latency_ms
        if record.ttft_ms is not None:
            row[5] += record.ttft_ms
            row[6] += 1
    return sums


def apply(records: list[UsageRecord]) -> int:
    """Add ``records`` to the minute rows in one transaction; returns the rows touched."""
    sums = aggregate(records)
    teams = set(Team.objects.filter(pk__in={k[1] for k in sums}).values_list("pk", flat=True))
    rows = [
        [connection.ops.adapt_datetimefield_value(k[0]), *k[1:], *v]
        for k, v in sums.items()
        if k[1] in teams  # a team deleted meanwhile takes its usage with it
    ]
    table = UsageMinute._meta.db_table
    # One upsert per row, the same SQL on SQLite and PostgreSQL: Django's bulk_create can only
    # overwrite on conflict, and these counters must add up across gateways.
    sql = (
        f"INSERT INTO {table} ({', '.join(COLUMNS)}) "  # noqa: S608 - names are constants
        f"VALUES ({', '.join(['%s'] * len(COLUMNS))}) "
        f"ON CONFLICT ({', '.join(IDENTITY)}) DO UPDATE SET "
        + ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in SUMMED)
    )
    last_used: dict[str, float] = {}
    for record in records:
        last_used[record.key_prefix] = max(last_used.get(record.key_prefix, 0), record.at)
    with transaction.atomic(), connection.cursor() as cursor:
        if rows:
            cursor.executemany(sql, rows)
        for prefix, at in last_used.items():
            moment = datetime.fromtimestamp(at, tz=UTC)
            ApiKey.objects.filter(prefix=prefix).filter(
                Q(last_used_at__isnull=True) | Q(last_used_at__lt=moment)
            ).update(last_used_at=moment)
    return len(rows)


def entry_time(entry_id: str) -> datetime:
    """When Redis logged a stream entry (its id is ``<Unix ms>-<sequence>``)."""
    return datetime.fromtimestamp(int(entry_id.split("-", 1)[0]) / 1000, tz=UTC)


def apply_entries(entries: list[tuple[str, UsageRecord]]) -> int:
    """Add the stream entries not applied before to the minute rows, and record them as
    applied, in one transaction; returns the entries newly applied."""
    table = AppliedEntry._meta.db_table
    fresh: set[str] = set()
    with transaction.atomic(), connection.cursor() as cursor:
        for start in range(0, len(entries), REMEMBER_CHUNK):
            chunk = entries[start : start + REMEMBER_CHUNK]
            # The same SQL on SQLite (3.35+) and PostgreSQL. RETURNING names only the rows
            # inserted: a concurrent consumer inserting the same id first (PostgreSQL makes
            # this one wait for its commit) leaves it out here, so exactly one counts it.
            cursor.execute(
                f"INSERT INTO {table} (entry_id, logged_at) VALUES "  # noqa: S608 - constants
                + ", ".join(["(%s, %s)"] * len(chunk))
                + " ON CONFLICT (entry_id) DO NOTHING RETURNING entry_id",
                [
                    value
                    for entry_id, _ in chunk
                    for value in (
                        entry_id,
                        connection.ops.adapt_datetimefield_value(entry_time(entry_id)),
                    )
                ],
            )
            fresh.update(row[0] for row in cursor.fetchall())
        apply([record for entry_id, record in entries if entry_id in fresh])
    return len(fresh)


def prune_applied(redis: Redis, instance: str, now: datetime | None = None) -> int:
    """Forget applied entry ids older than ``APPLIED_KEEP`` and than every pending entry."""
    cutoff = (now or timezone.now()) - APPLIED_KEEP
    try:
        pending = redis.xpending(stream_name(instance), GROUP)
    except ResponseError:  # no stream or group yet: nothing can be handed out again
        pending = {"pending": 0}
    if pending["pending"]:
        cutoff = min(cutoff, entry_time(pending["min"].decode()))
    deleted, _ = AppliedEntry.objects.filter(logged_at__lt=cutoff).delete()
    return deleted


def prune(now: datetime | None = None) -> int:
    """Remove minute rows older than ``BERTH_GATEWAY_USAGE_RETENTION_D``."""
    cutoff = (now or timezone.now()) - timedelta(days=settings.BERTH_GATEWAY_USAGE_RETENTION_D)
    deleted, _ = UsageMinute.objects.filter(minute__lt=cutoff).delete()
    return deleted


class Consumer:
    """The stream's consumer in this process (a thread: the ORM is synchronous)."""

    def __init__(self, redis: Redis, instance: str):
        self.redis = redis
        self.stream = stream_name(instance)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.claim_idle_ms = CLAIM_IDLE_MS
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="usage-consumer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped.set()
        self.thread.join(timeout)

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self._ensure_group()
                while not self.stopped.is_set():
                    self.step()
            except (RedisError, OSError) as exc:
                logger.warning("usage consumer: Redis error, retrying: %s", exc)
            except Exception:
                logger.exception("usage consumer: could not apply a batch; retrying")
            finally:
                connection.close()
            self.stopped.wait(1.0)

    def _ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def step(self) -> int:
        """Claim what a dead consumer left, read new entries, apply, acknowledge."""
        entries = self.take()
        if entries:
            self.commit(entries)
            self.ack(entries)
        return len(entries)

    def take(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Entries a dead consumer left pending (idle past ``claim_idle_ms``), then new ones."""
        _, claimed, _ = self.redis.xautoclaim(
            self.stream, GROUP, self.name, self.claim_idle_ms, "0-0", count=BATCH
        )
        entries = list(claimed)
        read = self.redis.xreadgroup(
            GROUP, self.name, {self.stream: ">"}, count=BATCH, block=None if entries else BLOCK_MS
        )
        for _, items in read or []:
            entries.extend(items)
        return [(entry_id, raw) for entry_id, raw in entries if raw]

    def commit(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Add ``entries`` to the minute rows, those not applied before (one transaction)."""
        apply_entries(
            [(entry_id.decode(), UsageRecord.from_fields(raw)) for entry_id, raw in entries]
        )

    def ack(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        self.redis.xack(self.stream, GROUP, *[entry_id for entry_id, _ in entries])


def drain(redis: Redis, instance: str, deadline_s: float = 10.0) -> int:
    """Apply everything in the stream now (tests, ``manage.py`` tools). Returns entries applied."""
    consumer = Consumer(redis, instance)
    consumer._ensure_group()
    total, end = 0, time.monotonic() + deadline_s
    while time.monotonic() < end:
        applied = consumer.step()
        total += applied
        if not applied:
            break
    return total
