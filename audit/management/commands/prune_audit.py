"""``manage.py prune_audit --older-than-days N | --before DATE [--force]``: delete old audit events.

Audit events are never deleted by default. This command refuses unless
``BERTH_AUDIT_RETENTION_DAYS`` is set (then the cutoff may not be more recent than that many
days) or ``--force`` is given. Without a cutoff option it uses the configured retention. The
last removed event is checkpointed first as an audited ``audit.pruned`` event, so
``audit_verify`` keeps verifying the rest (see ``audit.retention``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from audit.retention import PruneRefused, prune_before


def _cutoff_date(raw: str) -> datetime:
    moment = parse_datetime(raw)
    if moment is None:
        day = parse_date(raw)
        if day is None:
            raise CommandError(
                f"--before {raw!r}: use a date or date and time in ISO 8601, e.g. 2026-01-31 "
                "or 2026-01-31T12:00:00Z"
            )
        moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
    if timezone.is_naive(moment):
        moment = moment.replace(tzinfo=UTC)
    return moment


class Command(BaseCommand):
    help = "Delete audit events older than a cutoff, checkpointing the chain first."

    def add_arguments(self, parser: Any) -> None:
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--before", help="delete events recorded before this date (UTC)")
        group.add_argument(
            "--older-than-days", type=int, help="delete events older than this many days"
        )
        parser.add_argument(
            "--force",
            action="store_true",
            help="prune although BERTH_AUDIT_RETENTION_DAYS is 0 (keep forever) or the cutoff "
            "is more recent than it",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        retention_days = settings.BERTH_AUDIT_RETENTION_DAYS
        now = timezone.now()
        if options["before"]:
            cutoff = _cutoff_date(options["before"])
        elif options["older_than_days"] is not None:
            if options["older_than_days"] < 1:
                raise CommandError("--older-than-days: give a whole number of days, 1 or more")
            cutoff = now - timedelta(days=options["older_than_days"])
        elif retention_days:
            cutoff = now - timedelta(days=retention_days)
        else:
            raise CommandError(
                "give --before DATE or --older-than-days N (BERTH_AUDIT_RETENTION_DAYS is not set)"
            )
        if not options["force"]:
            if not retention_days:
                raise CommandError(
                    "audit events are kept forever: BERTH_AUDIT_RETENTION_DAYS is 0. Set it to "
                    "the number of days your policy keeps audit events, or pass --force"
                )
            if cutoff > now - timedelta(days=retention_days):
                raise CommandError(
                    f"the cutoff {cutoff:%Y-%m-%d %H:%M} UTC is more recent than the configured "
                    f"retention of {retention_days} days; pass --force to prune anyway"
                )
        try:
            result = prune_before(
                cutoff, retention_days=retention_days, forced=bool(options["force"])
            )
        except PruneRefused as exc:
            raise CommandError(f"not pruned: {exc}") from None
        if not result.deleted:
            self.stdout.write(f"no audit events older than {cutoff:%Y-%m-%d %H:%M} UTC")
            return
        self.stdout.write(
            f"pruned {result.deleted} audit events through sequence {result.through_seq}; "
            f"checkpoint recorded as event {result.checkpoint_seq}"
        )
