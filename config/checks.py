"""System checks Django's ``check --deploy`` does not make (reliability-security.md §2.1)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register

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
