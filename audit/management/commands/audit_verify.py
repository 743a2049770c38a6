"""``manage.py audit_verify``: recompute the audit hash chain; exit 1 at the first break.

After ``prune_audit`` the chain is verified from the sanctioned prune it starts after; a missing
head without one is reported like any other gap. With anchors on (``BERTH_AUDIT_ANCHOR_DIR``)
the chain is also compared with the latest signed anchor. Either way the output says how many
events were expected and how many were found."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from audit import anchors, chain
from audit.verification import current_checkpoint, verify_and_record, verify_stored_chain


def counts(result: chain.Verification) -> str:
    """``expected N events, found M`` with the missing ranges and leftover rows, if any."""
    text = f"expected {result.expected} events, found {result.found}"
    if result.missing:
        ranges = ", ".join(
            str(low) if low == high else f"{low}-{high}" for low, high in result.missing[:10]
        )
        text += f"; missing: {ranges}"
    if result.extra:
        text += f"; {result.extra} events that should have been pruned"
    return text


class Command(BaseCommand):
    help = "Verify the audit hash chain; exit 1 naming the first broken sequence number."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--record",
            action="store_true",
            help="append the result to the audit trail as an audit.verified event (and, with "
            "anchors on, anchor the verified chain)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        result = verify_and_record() if options["record"] else verify_stored_chain()
        if not result.ok:
            raise CommandError(
                f"audit chain broken at sequence {result.first_bad_seq}: {result.reason} "
                f"({result.checked} events verified before it; {counts(result)})"
            )
        checkpoint = current_checkpoint()
        since = (
            f" (from the prune checkpoint after sequence {checkpoint.through_seq})"
            if checkpoint
            else ""
        )
        anchor = anchors.latest_anchor()
        anchored = (
            f"; matches the anchor of {anchor.time} through sequence {anchor.last_seq}"
            if anchor
            else ("; no anchor yet" if anchors.enabled() else "")
        )
        self.stdout.write(
            f"audit chain intact: {result.checked} events, last sequence {result.last_seq}"
            f"{since}; {counts(result)}{anchored}"
        )
