"""The audit trail: one append-only, hash-chained table."""

from __future__ import annotations

import json
from typing import Any, NoReturn

from django.conf import settings
from django.db import models
from django.utils import timezone

from audit.actions import Action, ActorKind, Outcome


class AppendOnlyError(Exception):
    """Raised when code tries to change or remove an audit event."""


def _refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise AppendOnlyError("the audit trail is append-only: events cannot be changed or deleted")


class AuditEventQuerySet(models.QuerySet):
    """Reads only. Writes go through ``audit.record()``; bulk paths that would bypass the chain
    raise. (Deleting a user still nulls ``actor`` through Django's base manager, which the
    PostgreSQL trigger also allows: the copied ``actor_name`` is what the chain protects.)"""

    update = _refuse
    delete = _refuse
    bulk_update = _refuse
    bulk_create = _refuse
    update_or_create = _refuse
    get_or_create = _refuse
    create = _refuse


class AuditEvent(models.Model):
    """One thing that happened: who did what to which target, with which outcome.

    ``seq`` is gap-free; ``hash`` chains each row to the one before it (``audit.chain``), so
    ``manage.py audit_verify`` finds an edited or deleted row by its sequence number.
    """

    seq = models.PositiveBigIntegerField(unique=True)
    # Non-decreasing in ``seq``: ``record()`` stamps it under the chain lock, so a time range is
    # one contiguous range of sequence numbers (the review page relies on this).
    time = models.DateTimeField()
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_name = models.CharField(max_length=150)
    actor_kind = models.CharField(max_length=10, choices=ActorKind.choices)
    team = models.ForeignKey(
        "accounts.Team", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    team_slug = models.CharField(max_length=64, blank=True)
    # No ``choices``: the registry (audit.actions.Action) grows with every feature and
    # ``record()`` enforces it; choices here would need a migration per new verb.
    action = models.CharField(max_length=64)
    target_type = models.CharField(max_length=100, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    target_repr = models.CharField(max_length=200, blank=True)
    request_id = models.CharField(max_length=64, blank=True)
    job_id = models.CharField(max_length=64, blank=True)
    client_ip = models.CharField(max_length=45, blank=True)
    outcome = models.CharField(max_length=10, choices=Outcome.choices, default=Outcome.OK)
    # Canonical JSON text, not a JSONField: the chain hashes these exact bytes, and a database
    # that re-encodes numbers (PostgreSQL jsonb) would otherwise break verification.
    payload_json = models.TextField(default="{}")
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        ordering = ["-seq"]
        # The review page filters on one column and walks ``seq`` backwards (keyset pages), so
        # each filter has a (column, seq) index that answers "newest 50 matching before N" as a
        # range scan; ``benchmarks/audit_review.py`` measures them at a million rows.
        indexes = [
            models.Index(fields=["time", "seq"], name="audit_time_seq_idx"),
            models.Index(fields=["action", "seq"], name="audit_action_seq_idx"),
            models.Index(fields=["actor_name", "seq"], name="audit_actor_name_seq_idx"),
            models.Index(fields=["team_slug", "seq"], name="audit_team_slug_seq_idx"),
            models.Index(fields=["outcome", "seq"], name="audit_outcome_seq_idx"),
            models.Index(fields=["request_id", "seq"], name="audit_request_seq_idx"),
            models.Index(fields=["job_id", "seq"], name="audit_job_seq_idx"),
            models.Index(fields=["target_type", "target_id", "seq"], name="audit_target_seq_idx"),
            models.Index(fields=["team", "-seq"], name="audit_team_seq_idx"),
            models.Index(fields=["actor", "-seq"], name="audit_actor_seq_idx"),
        ]

    def __str__(self) -> str:
        return f"#{self.seq} {self.action} by {self.actor_name} ({self.outcome})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            _refuse()
        kwargs["force_insert"] = True
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> NoReturn:
        _refuse()

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.payload_json)

    @property
    def change(self) -> tuple[str, str] | None:
        """``(old, new)`` for an event that records a change (a deployment's state, a role, a
        quota: its payload holds both as plain values), else None."""
        payload = self.payload
        old, new = payload.get("old"), payload.get("new")
        plain = (str, int, float)
        if isinstance(old, plain) and isinstance(new, plain):
            return str(old), str(new)
        return None

    @property
    def action_label(self) -> str:
        try:
            return Action(self.action).label
        except ValueError:
            return self.action


class AuditPrune(models.Model):
    """A sanctioned removal of the chain's head: events up to ``through_seq`` are gone, and the
    stored chain starts after it (``through_hash`` is the last removed event's hash).

    On PostgreSQL only ``berth_audit_prune()`` writes these rows (a trigger refuses anyone else),
    and only that function may delete audit events; a row here — not an ``audit.pruned`` event,
    which anyone who can append could forge — is what lets verification start past seq 1.
    """

    through_seq = models.PositiveBigIntegerField(unique=True)
    through_hash = models.CharField(max_length=64)
    checkpoint_seq = models.PositiveBigIntegerField()
    deleted = models.PositiveBigIntegerField()
    time = models.DateTimeField(default=timezone.now)
    pruned_by = models.CharField(max_length=150, blank=True)

    class Meta:
        ordering = ["-through_seq"]

    def __str__(self) -> str:
        return f"pruned through #{self.through_seq} ({self.deleted} events)"
