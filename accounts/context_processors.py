"""Template context: the signed-in user's role, for navigation."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from accounts.models import Role


def role(request: HttpRequest) -> dict[str, Any]:
    user = getattr(request, "user", None)
    current = user.role if user is not None and user.is_authenticated else None
    return {
        "user_role": current,
        "can_operate": current in (Role.MEMBER, Role.ADMIN),
        "can_audit": current in (Role.AUDITOR, Role.ADMIN),
        "is_admin": current == Role.ADMIN,
    }
