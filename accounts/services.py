"""Actions on accounts and teams. Each one is audited; the admin calls these too."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from django.db import transaction

import audit
from accounts.models import Membership, Role, Team, User
from audit.actions import Action

GENERATED_PASSWORD_BYTES = 18


def create_team(slug: str, name: str, description: str = "") -> Team:
    """Create a team (the slug is validated like a form would)."""
    team = Team(slug=slug, name=name, description=description)
    team.full_clean()
    with transaction.atomic():
        team.save()
        audit.record(Action.TEAM_CREATED, target=team, team=team, slug=slug, name=name)
    return team


def add_member(team: Team, user: User) -> Membership:
    """Make ``user`` a member of ``team`` (idempotent; only a new membership is audited)."""
    with transaction.atomic():
        membership, created = Membership.objects.get_or_create(team=team, user=user)
        if created:
            audit.record(Action.TEAM_MEMBER_ADDED, target=user, team=team, username=user.username)
    return membership


def remove_member(team: Team, user: User) -> bool:
    with transaction.atomic():
        deleted, _ = Membership.objects.filter(team=team, user=user).delete()
        if deleted:
            audit.record(Action.TEAM_MEMBER_REMOVED, target=user, team=team, username=user.username)
    return bool(deleted)


def set_role(user: User, role: Role) -> None:
    old = user.role
    if old == role:
        return
    with transaction.atomic():
        user.role = role
        user.save(update_fields=["role", "is_staff", "is_superuser"])
        audit.record(Action.ACCOUNT_ROLE_CHANGED, target=user, old=old, new=str(role))


@dataclass(frozen=True)
class BootstrapResult:
    created: bool
    username: str
    password: str | None  # only when generated here: shown once, never stored in clear


def ensure_first_admin(username: str, password: str | None, email: str = "") -> BootstrapResult:
    """Create the first admin account if no admin exists yet.

    With no password given, one is generated and returned so the caller can show it once.
    """
    with transaction.atomic():
        existing = User.objects.filter(role=Role.ADMIN, is_active=True).order_by("pk").first()
        if existing is not None:
            return BootstrapResult(False, existing.username, None)
        generated = password is None
        password = password or secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)
        user = User.objects.create_superuser(username=username, email=email, password=password)
        audit.record(
            Action.ACCOUNT_ADMIN_CREATED,
            target=user,
            username=username,
            password_generated=generated,
        )
    return BootstrapResult(True, username, password if generated else None)


def create_user(username: str, password: str, role: Role = Role.MEMBER, **fields: Any) -> User:
    """Create an account with a role (audited)."""
    with transaction.atomic():
        user = User.objects.create_user(username=username, password=password, role=role, **fields)
        audit.record(Action.ACCOUNT_CREATED, target=user, username=username, role=str(role))
    return user
