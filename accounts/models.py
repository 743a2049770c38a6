"""Users, their role, and the teams they deploy for.

Why a small ``Team`` model and not Django's ``Group``: a group is a bundle of model permissions,
while a team *owns* things (models, deployments, GPU quota) and appears in every audit event.
Reusing ``Group`` would mix the two meanings (an "auditors" group is not a team) and leave no
place for a slug, a quota or ownership rules. Roles are global, not per team: a member deploys
for the teams they belong to, an auditor reads the audit trail and nothing else, an admin may do
everything. The role alone decides ``is_staff``/``is_superuser``, so the Django admin and the RQ
dashboard are reachable by admins only.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractUser, UserManager
from django.core.validators import RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Role(models.TextChoices):
    MEMBER = "member", "Member"
    AUDITOR = "auditor", "Auditor"
    ADMIN = "admin", "Admin"


class BerthUserManager(UserManager):
    def create_superuser(
        self, username: str, email: str | None = None, password: str | None = None, **extra: Any
    ):
        extra["role"] = Role.ADMIN
        return super().create_superuser(username, email, password, **extra)


class User(AbstractUser):
    """A person who signs in. ``role`` is the single source of their global rights."""

    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    teams = models.ManyToManyField("Team", through="Membership", related_name="members", blank=True)

    objects = BerthUserManager()

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.is_staff = self.is_superuser = self.role == Role.ADMIN
        super().save(*args, **kwargs)

    @property
    def is_admin(self) -> bool:
        return self.is_active and self.role == Role.ADMIN

    @property
    def is_auditor(self) -> bool:
        return self.is_active and self.role == Role.AUDITOR

    @property
    def is_member(self) -> bool:
        return self.is_active and self.role == Role.MEMBER


slug_validator = RegexValidator(
    r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$",
    "Use 1-64 lowercase letters, digits and hyphens, starting and ending with a letter or digit.",
)


class Team(models.Model):
    """A group of users that owns models and deployments; the unit of quotas and visibility."""

    slug = models.CharField(max_length=64, unique=True, validators=[slug_validator])
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    gpu_quota = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="GPUs the team's deployments may hold at once (empty: no limit)",
    )
    host_memory_quota_gib = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="GiB of host memory the team's CPU engines may hold at once, the CPU "
        "counterpart of the GPU quota (empty: no limit)",
    )
    monthly_token_budget = models.PositiveBigIntegerField(
        null=True,
        blank=True,
        help_text="Tokens (prompt + completion) the team's keys may use per calendar month, UTC, "
        "through the gateway (empty: no limit)",
    )
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    """A user's membership of a team."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "team"], name="membership_unique")]

    def __str__(self) -> str:
        return f"{self.user} in {self.team}"


class KeyScope(models.TextChoices):
    INFERENCE = "inference", "Inference (the OpenAI-compatible gateway)"
    MANAGE = "manage", "Manage (the JSON deployment API)"


class ApiKeyQuerySet(models.QuerySet):
    def usable(self, now: Any = None) -> ApiKeyQuerySet:
        """Not revoked and not expired."""
        now = now or timezone.now()
        return self.filter(revoked_at__isnull=True).filter(
            Q(expires__isnull=True) | Q(expires__gt=now)
        )


class ApiKey(models.Model):
    """A team's key for the gateway (scope ``inference``) or the JSON API (``manage``).

    The key ``bk_<prefix>_<secret>`` is shown once; only its SHA-256 is stored (the secret is
    192 random bits, so a fast hash is enough: nobody can search that space, and the gateway
    checks a key on every request). It belongs to the team, not to whoever created it: removing
    the creator from the team leaves the key working. ``model_names`` lists the served model
    names it may reach; empty means every model of the team. ``accounts.keys`` creates, rotates
    and revokes keys, each change audited and pushed to every gateway.
    """

    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    scope = models.CharField(max_length=10, choices=KeyScope.choices, default=KeyScope.INFERENCE)
    model_names = models.JSONField(default=list, blank=True)
    expires = models.DateTimeField(null=True, blank=True)
    rpm = models.PositiveIntegerField(null=True, blank=True, help_text="Requests per minute")
    tpm = models.PositiveIntegerField(null=True, blank=True, help_text="Tokens per minute")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # Set once, by whoever first sees the key past its expiry (the audit event is written then).
    expiry_recorded = models.BooleanField(default=False)
    last_used_at = models.DateTimeField(null=True, blank=True)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        ordering = ["team", "-created"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"bk_{self.prefix} ({self.name})"

    @property
    def display(self) -> str:
        """What pages and audit events show: the public part only."""
        return f"bk_{self.prefix}_…"

    def is_expired(self, now: Any = None) -> bool:
        return self.expires is not None and self.expires <= (now or timezone.now())
