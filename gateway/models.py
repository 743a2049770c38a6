"""Usage through the gateway, aggregated per minute.

Each completed request is one entry of a Redis stream (``gateway.usage``); consumers fold
entries into these rows. A row is identified by plain values — the key's prefix, the served
model name, the deployment's id — not foreign keys, so the history outlives a deleted
deployment; only the team cascades. Rows older than ``BERTH_GATEWAY_USAGE_RETENTION_D`` are
removed by the consumers.
"""

from __future__ import annotations

from django.db import models

from accounts.access import TeamOwnedQuerySet
from accounts.models import Team


class UsageMinute(models.Model):
    """Requests, tokens and latency of one key on one model's deployment in one minute (UTC)."""

    minute = models.DateTimeField()
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="+")
    key_prefix = models.CharField(max_length=16)
    model = models.CharField(max_length=64)
    deployment_id = models.BigIntegerField()
    replica = models.IntegerField(default=0)
    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    latency_ms_sum = models.FloatField(default=0)
    ttft_ms_sum = models.FloatField(default=0)
    ttft_count = models.PositiveIntegerField(default=0)

    objects = TeamOwnedQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["minute", "team", "key_prefix", "model", "deployment_id", "replica"],
                name="usage_minute_unique",
            )
        ]
        indexes = [
            models.Index(fields=["team", "minute"], name="usage_team_minute_idx"),
            models.Index(fields=["model", "minute"], name="usage_model_minute_idx"),
            models.Index(fields=["minute"], name="usage_minute_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.minute:%Y-%m-%d %H:%M} {self.key_prefix} {self.model}: {self.requests}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class AppliedEntry(models.Model):
    """A usage stream entry already added to the minute rows, written in the same transaction:
    an entry delivered again (its consumer died between committing and acknowledging it) is
    recognised and acknowledged without being counted twice. Kept until no consumer can be
    handed the entry again (``gateway.usage.prune_applied``)."""

    entry_id = models.CharField(max_length=40, primary_key=True)  # Redis's "<ms>-<seq>"
    logged_at = models.DateTimeField(db_index=True)  # the entry's time, from its id

    def __str__(self) -> str:
        return self.entry_id
