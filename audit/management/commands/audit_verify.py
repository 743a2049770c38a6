"""``manage.py audit_verify``: recompute the audit hash chain; exit 1 at the first break.

After ``prune_audit`` the chain is verified from the checkpoint its ``audit.pruned`` event
recorded; a missing head without such a checkpoint is reported like any other gap."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from audit.verification import current_checkpoint, verify_and_record, verify_stored_chain


class Command(BaseCommand):
    help = "Verify the audit hash chain; exit 1 naming the first broken sequence number."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--record",
            action="store_true",
            help="append the result to the audit trail as an audit.verified event",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        result = verify_and_record() if options["record"] else verify_stored_chain()
        if not result.ok:
            raise CommandError(
                f"audit chain broken at sequence {result.first_bad_seq}: {result.reason} "
                f"({result.checked} events verified before it)"
            )
        checkpoint = current_checkpoint()
        since = (
            f" (from the prune checkpoint after sequence {checkpoint.through_seq})"
            if checkpoint
            else ""
        )
        self.stdout.write(
            f"audit chain intact: {result.checked} events, last sequence {result.last_seq}{since}"
        )
