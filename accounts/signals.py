"""Sign-in, sign-out and failed sign-in are audited."""

from __future__ import annotations

from typing import Any

from axes.signals import user_locked_out
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.dispatch import receiver

import audit
from audit.actions import Action, Outcome

MAX_ATTEMPTED_NAME = 150


@receiver(user_logged_in)
def audit_login(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    audit.record(Action.AUTH_LOGIN, actor=user, target=user)


@receiver(user_logged_out)
def audit_logout(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    if user is not None:
        audit.record(Action.AUTH_LOGOUT, actor=user, target=user)


@receiver(user_login_failed)
def audit_login_failed(
    sender: Any, credentials: dict[str, Any], request: Any = None, **kwargs: Any
) -> None:
    # Django already masks the password in ``credentials``; only the attempted name is kept.
    attempted = str(credentials.get("username", ""))[:MAX_ATTEMPTED_NAME]
    audit.record(Action.AUTH_LOGIN_FAILED, outcome=Outcome.DENIED, attempted_username=attempted)


@receiver(user_locked_out)
def audit_lockout(
    sender: Any,
    request: Any = None,
    username: str | None = None,
    ip_address: str | None = None,
    **kwargs: Any,
) -> None:
    audit.record(
        Action.AUTH_LOCKED_OUT,
        outcome=Outcome.DENIED,
        attempted_username=str(username or "")[:MAX_ATTEMPTED_NAME],
        address=ip_address or "",
    )
