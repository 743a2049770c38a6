"""System checks Django's ``check --deploy`` does not make: a weak SECRET_KEY of our own
shape, a missing CSP, empty password validators, login throttling."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register

from audit.anchors import MIN_KEY_LENGTH as MIN_ANCHOR_KEY_LENGTH

UNSAFE_SOURCES = ("'unsafe-inline'", "'unsafe-eval'", "*")


@register(Tags.security, deploy=True)
def check_csp(app_configs: Any, **kwargs: Any) -> list[Error]:
    policy = getattr(settings, "SECURE_CSP", None) or {}
    if not policy.get("default-src") or not policy.get("script-src"):
        return [
            Error(
                "SECURE_CSP has no default-src or script-src",
                hint="Restore the policy in config/settings.py.",
                id="berth.E001",
            )
        ]
    unsafe = [source for source in policy["script-src"] if str(source) in UNSAFE_SOURCES]
    if unsafe:
        return [
            Error(
                f"SECURE_CSP script-src allows {', '.join(map(str, unsafe))}",
                hint="Use nonces instead.",
                id="berth.E002",
            )
        ]
    return []


@register(Tags.security, deploy=True)
def check_password_validators(app_configs: Any, **kwargs: Any) -> list[Warning]:
    if not settings.AUTH_PASSWORD_VALIDATORS:
        return [
            Warning(
                "AUTH_PASSWORD_VALIDATORS is empty",
                hint="Keep Django's four validators.",
                id="berth.W003",
            )
        ]
    return []


@register(Tags.security, deploy=True)
def check_production_debug(app_configs: Any, **kwargs: Any) -> list[Error]:
    if settings.PRODUCTION and settings.DEBUG:
        return [
            Error("DEBUG is on with BERTH_ENV=production", hint="Unset DEBUG.", id="berth.E004")
        ]
    return []


# Django's own W009 stops at "under 50 characters or under 5 distinct ones"; a key such as
# "changeme-changeme-..." passes that. Ask for what secrets.token_urlsafe(50) gives.
MIN_SECRET_KEY_LENGTH = 50
MIN_SECRET_KEY_DISTINCT = 16  # token_urlsafe(50) has ~40 distinct characters of 64
WEAK_SECRET_PREFIXES = ("django-insecure-", "changeme", "secret", "berth")


def secret_key_problem(key: str) -> str | None:
    """Why ``key`` is too weak to sign sessions, or None."""
    if len(key) < MIN_SECRET_KEY_LENGTH:
        return f"it has {len(key)} characters; use at least {MIN_SECRET_KEY_LENGTH}"
    if len(set(key)) < MIN_SECRET_KEY_DISTINCT:
        return f"it uses only {len(set(key))} distinct characters (low entropy)"
    if key.lower().startswith(WEAK_SECRET_PREFIXES):
        return "it starts like a placeholder or Django's generated development key"
    return None


@register(Tags.security, deploy=True)
def check_secret_key(app_configs: Any, **kwargs: Any) -> list[Error]:
    """In production the key and every fallback must be long random strings."""
    if not settings.PRODUCTION:
        return []
    keys = [("SECRET_KEY", settings.SECRET_KEY)] + [
        (f"SECRET_KEY_FALLBACKS[{index}]", key)
        for index, key in enumerate(settings.SECRET_KEY_FALLBACKS)
    ]
    return [
        Error(
            f"{name} is weak: {problem}",
            hint="Generate one: python3 -c 'import secrets; print(secrets.token_urlsafe(50))'",
            id="berth.E005",
        )
        for name, key in keys
        if (problem := secret_key_problem(str(key))) is not None
    ]


@register(Tags.security, deploy=True)
def check_login_throttling(app_configs: Any, **kwargs: Any) -> list[Warning]:
    """django-axes must lock a username from one address, for a while: locking by address alone
    lets one client behind the proxy lock everyone out (django-axes' default locks by address,
    forever)."""
    problems = []
    if not getattr(settings, "AXES_ENABLED", True):
        problems.append("AXES_ENABLED is off: sign-in attempts are not throttled")
    parameters = getattr(settings, "AXES_LOCKOUT_PARAMETERS", ["ip_address"])
    if any(entry in ("ip_address", ["ip_address"]) for entry in parameters):
        problems.append("AXES_LOCKOUT_PARAMETERS locks a whole address")
    if getattr(settings, "AXES_COOLOFF_TIME", None) is None:
        problems.append("AXES_COOLOFF_TIME is unset: a lockout lasts until an admin resets it")
    return [
        Warning(
            problem,
            hint='Keep AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]] and a cool-off.',
            id="berth.W006",
        )
        for problem in problems
    ]


@register(Tags.security, deploy=True)
def check_audit_anchors(app_configs: Any, **kwargs: Any) -> list[Warning]:
    """Without anchors outside the database, whoever holds the database's credentials (every
    host agent) can rewrite the audit chain so that it still verifies (audit/anchors.py)."""
    if not settings.BERTH_AUDIT_ANCHOR_DIR:
        return [
            Warning(
                "BERTH_AUDIT_ANCHOR_DIR is not set: the audit chain has no signed anchor outside "
                "the database",
                hint="Set BERTH_AUDIT_ANCHOR_DIR and BERTH_AUDIT_ANCHOR_KEY on the console "
                "(README: Anchors outside the database).",
                id="berth.W011",
            )
        ]
    if len(settings.BERTH_AUDIT_ANCHOR_KEY) < MIN_ANCHOR_KEY_LENGTH:
        return [
            Warning(
                "BERTH_AUDIT_ANCHOR_DIR is set but BERTH_AUDIT_ANCHOR_KEY is missing or short: "
                "no anchor can be written or checked",
                hint=f"Give the console a random key of {MIN_ANCHOR_KEY_LENGTH}+ characters.",
                id="berth.W012",
            )
        ]
    return []
