"""API keys: made, checked, rotated, revoked and expired here, every change audited.

A key reads ``bk_<prefix>_<secret>``: the prefix (8 hex digits) finds the row and is what pages
and audit events show; the secret is 192 random bits. Only ``sha256(key)`` is stored, and a
presented key is compared with :func:`hmac.compare_digest`, so timing says nothing about how
much of it matched. The clear key exists once, in the return value of :func:`create_api_key`
or :func:`rotate_api_key`; nothing logs it::

    key, clear = create_api_key(team, "ci", scope=KeyScope.MANAGE, created_by=user)
    print(clear)        # bk_1a2b3c4d_...  shown once

Every change is pushed on :func:`keys_channel` once its transaction commits, so each gateway
drops a revoked key within a second.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from redis.exceptions import RedisError

import audit
from accounts.models import ApiKey, KeyScope, Role, Team, slug_validator
from audit.actions import Action, ActorKind, Outcome
from audit.trail import denial_reason
from core import context, naming
from core.queues import redis_connection

logger = logging.getLogger(__name__)

KEY_PREFIX = "bk"
PREFIX_BYTES = 4  # 8 hex digits: finds the row, shown on pages
SECRET_BYTES = 24  # 192 bits, above the 128 the threat model asks for
KEY_PATTERN = re.compile(r"bk_([0-9a-f]{8})_([A-Za-z0-9_-]{32})")
MAX_EXPIRES_DAYS = 3650
MAX_NAME = 100
MAX_MODELS = 64


def keys_channel() -> str:
    """Pub/sub channel of key and team-limit changes on this console (``core.naming``)."""
    return naming.api_keys_channel(settings.BERTH_INSTANCE)


def hash_key(clear: str) -> str:
    return hashlib.sha256(clear.encode("ascii")).hexdigest()


def parse_key(presented: str) -> str | None:
    """The prefix of a well-formed key, or None. Nothing else about the text is trusted."""
    match = KEY_PATTERN.fullmatch(presented)
    return match.group(1) if match else None


def secret_matches(presented: str, secret_hash: str) -> bool:
    """Constant-time comparison of a presented key with a stored hash."""
    return hmac.compare_digest(hash_key(presented).encode(), secret_hash.encode())


def _new_clear_key() -> tuple[str, str]:
    prefix = secrets.token_hex(PREFIX_BYTES)
    return prefix, f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"


@dataclass(frozen=True)
class KeySettings:
    """What a key may do, validated; every error names its field."""

    name: str
    scope: str = KeyScope.INFERENCE
    model_names: tuple[str, ...] = ()
    expires_days: int | None = None
    rpm: int | None = None
    tpm: int | None = None

    def check(self) -> None:
        errors: dict[str, str] = {}
        if not self.name.strip() or len(self.name) > MAX_NAME or not self.name.isprintable():
            errors["name"] = f"give the key a printable name of 1-{MAX_NAME} characters"
        if self.scope not in KeyScope.values:
            errors["scope"] = f"scope must be one of: {', '.join(KeyScope.values)}"
        bad = [name for name in self.model_names if not _is_slug(name)]
        if bad or len(self.model_names) > MAX_MODELS:
            errors["models"] = (
                f"served model names (deployment names, up to {MAX_MODELS}); not valid: "
                + ", ".join(repr(name) for name in bad[:5])
            )
        if self.expires_days is not None and not 1 <= self.expires_days <= MAX_EXPIRES_DAYS:
            errors["expires_days"] = f"expiry must be 1-{MAX_EXPIRES_DAYS} days (or none)"
        for field_name in ("rpm", "tpm"):
            value = getattr(self, field_name)
            if value is not None and value < 1:
                errors[field_name] = f"{field_name} must be a positive whole number (or none)"
        if errors:
            raise ValidationError(errors)


def _is_slug(name: str) -> bool:
    try:
        slug_validator(name)
    except ValidationError:
        return False
    return True


def create_api_key(
    team: Team, wanted: KeySettings, *, created_by: Any = None
) -> tuple[ApiKey, str]:
    """Make a key for ``team`` and return it with its clear text (the only copy). Invalid
    settings raise ``ValidationError`` naming the field, audited as ``denied``."""
    try:
        wanted.check()
    except ValidationError as exc:
        record_refused_creation(team, denial_reason(exc))
        raise
    prefix, clear = _new_clear_key()
    expires = timezone.now() + timedelta(days=wanted.expires_days) if wanted.expires_days else None
    key = ApiKey(
        team=team,
        name=wanted.name.strip(),
        prefix=prefix,
        secret_hash=hash_key(clear),
        scope=wanted.scope,
        model_names=sorted(set(wanted.model_names)),
        expires=expires,
        rpm=wanted.rpm,
        tpm=wanted.tpm,
        created_by=created_by,
    )
    with transaction.atomic():
        key.save()
        audit.record(Action.API_KEY_CREATED, target=key, team=team, **_described(key))
        publish_keys_changed()
    return key, clear


def record_refused_creation(team: Team, reason: str) -> None:
    """Audit a key that was asked for and refused (a form's or a command's bad value)."""
    audit.record(Action.API_KEY_CREATED, team=team, outcome=Outcome.DENIED, reason=reason[:500])


def revoke_api_key(key: ApiKey, *, reason: str = "") -> bool:
    """Revoke ``key`` (idempotent: False when it already was). Gateways drop it within a
    second of the commit."""
    with transaction.atomic():
        now = timezone.now()
        changed = ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=now)
        if not changed:
            return False
        key.revoked_at = now
        audit.record(
            Action.API_KEY_REVOKED,
            target=key,
            team=key.team,
            prefix=key.prefix,
            reason=reason[:200],
        )
        publish_keys_changed()
    return True


def rotate_api_key(key: ApiKey, *, created_by: Any = None) -> tuple[ApiKey, str]:
    """A new key with the same name, scope, models and limits; the old one is revoked in the
    same transaction. The expiry keeps its length from now."""
    days = None
    if key.expires is not None:
        days = max(1, (key.expires - key.created).days)
    wanted = KeySettings(key.name, key.scope, tuple(key.model_names), days, key.rpm, key.tpm)
    with transaction.atomic():
        if not revoke_api_key(key, reason="rotated"):
            raise ValidationError({"key": "this key is revoked already; create a new one"})
        new_key, clear = create_api_key(key.team, wanted, created_by=created_by)
        audit.record(
            Action.API_KEY_ROTATED,
            target=new_key,
            team=key.team,
            old_prefix=key.prefix,
            new_prefix=new_key.prefix,
        )
    return new_key, clear


def authenticate(presented: str, scope: str) -> ApiKey | None:
    """The usable key of ``scope`` that ``presented`` is, or None (the caller refuses and
    audits with :func:`record_denied`)."""
    prefix = parse_key(presented)
    if prefix is None:
        return None
    key = ApiKey.objects.select_related("team").filter(prefix=prefix).first()
    if key is None or not secret_matches(presented, key.secret_hash):
        return None
    if key.revoked_at is not None or key.is_expired() or key.scope != scope:
        return None
    return key


def record_expired(now: Any = None) -> int:
    """Audit each key that has passed its expiry, once (a conditional update decides who
    writes the event when several gateways look at the same moment). Returns how many."""
    now = now or timezone.now()
    due = list(
        ApiKey.objects.select_related("team").filter(
            expires__lte=now, expiry_recorded=False, revoked_at__isnull=True
        )[:500]
    )
    written = 0
    for key in due:
        with transaction.atomic():
            if ApiKey.objects.filter(pk=key.pk, expiry_recorded=False).update(expiry_recorded=True):
                audit.record(
                    Action.API_KEY_EXPIRED,
                    target=key,
                    team=key.team,
                    prefix=key.prefix,
                    expires=key.expires.isoformat(),
                )
                written += 1
    if written:
        publish_keys_changed()
    return written


class KeyUser:
    """A ``manage``-scoped key standing in for a user on the JSON API: a member of its one team,
    never an admin, with no row of its own. Audit events name it (actor kind ``key``, its
    prefix and team); ``accounts.access`` sees exactly its team."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_admin = False
    is_auditor = False
    is_member = True
    is_staff = False
    is_superuser = False
    role = Role.MEMBER
    pk = id = None
    actor_kind = ActorKind.KEY.value

    def __init__(self, key: ApiKey):
        self.key = key
        self._berth_team_ids = [key.team_id]  # accounts.access.team_ids reads this
        self.username = f"key bk_{key.prefix} ({key.team.slug})"

    def get_username(self) -> str:
        return self.username

    def __str__(self) -> str:
        return self.username


def record_denied(
    prefix: str | None, reason: str, *, team: Team | None = None, **data: Any
) -> None:
    """Audit a refused request made with a key (``prefix`` None: not even well-formed)."""
    shown = f"bk_{prefix}" if prefix else "(malformed)"
    with context.bind(
        request=None, actor_id=None, actor_name=f"key {shown}", actor_kind=ActorKind.KEY.value
    ):
        audit.record(
            Action.API_KEY_DENIED,
            team=team,
            outcome=Outcome.DENIED,
            prefix=prefix or "",
            reason=reason,
            **data,
        )


def publish_keys_changed() -> None:
    """Tell every gateway to reload keys and team limits, after the transaction commits. A lost
    push is caught by the gateway's periodic reload."""

    def send() -> None:
        try:
            redis_connection().publish(keys_channel(), "changed")
        except RedisError as exc:
            logger.warning("could not publish a key change: %s", exc)

    transaction.on_commit(send)


def _described(key: ApiKey) -> dict[str, Any]:
    return {
        "prefix": key.prefix,
        "name": key.name,
        "scope": key.scope,
        "models": list(key.model_names),
        "expires": key.expires.isoformat() if key.expires else None,
        "rpm": key.rpm,
        "tpm": key.tpm,
    }


def described(keys: Sequence[ApiKey]) -> list[dict[str, Any]]:
    """Keys as JSON-native dicts for pages and commands (never the hash)."""
    return [{"id": str(key.public_id), **_described(key)} for key in keys]
