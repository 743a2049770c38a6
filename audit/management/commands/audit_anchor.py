"""``manage.py audit_anchor``: check the audit chain since the latest anchor, then write a new
signed anchor into ``BERTH_AUDIT_ANCHOR_DIR`` (run it from cron on the console machine, e.g.
hourly; the default worker also anchors after each scheduled verification)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from audit import anchors
from audit.verification import anchor_chain


class Command(BaseCommand):
    help = "Anchor the audit chain outside the database (signed digest of its current state)."

    def handle(self, *args: Any, **options: Any) -> None:
        if not anchors.enabled():
            raise CommandError(
                "anchors are off: set BERTH_AUDIT_ANCHOR_DIR (a directory the database role "
                "cannot write) and BERTH_AUDIT_ANCHOR_KEY"
            )
        try:
            anchor = anchor_chain(reason="command")
        except anchors.AnchorError as exc:
            raise CommandError(str(exc)) from None
        if anchor is None:
            self.stdout.write("the audit trail is empty: nothing to anchor")
            return
        self.stdout.write(
            f"anchored sequences {anchor.first_seq}-{anchor.last_seq} ({anchor.count} events) "
            f"at {anchor.time}"
        )
