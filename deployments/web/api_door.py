"""Who is calling the JSON API: a ``manage``-scoped API key, or the browser session.

``Authorization: Bearer bk_<prefix>_<secret>`` (a key of scope ``manage``) needs no CSRF token:
the header is not something a browser sends on its own. The key acts as a member of its one
team (``accounts.keys.KeyUser``), and audit events name it. Without the header, the session
works as before, with Django's CSRF check on writes. Refusals are JSON: 401 without valid
credentials, 403 for a failed CSRF check or a role that may not deploy.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware

from accounts import keys
from accounts.models import KeyScope, Role

BEARER = "Bearer "


class _CsrfCheck(CsrfViewMiddleware):
    """Django's own CSRF check, answering with the reason instead of the HTML 403 page."""

    def _reject(self, request: HttpRequest, reason: str) -> str:  # type: ignore[override]
        return reason


def _unanswered(request: HttpRequest) -> HttpResponse:
    raise AssertionError("the CSRF check never calls the view")


def error(field: str, message: str, status: int) -> JsonResponse:
    return JsonResponse({"errors": {field: message}}, status=status)


def principal(request: HttpRequest, *, write: bool) -> tuple[Any, JsonResponse | None]:
    """(the acting user or key, None) or (None, the JSON refusal)."""
    header = request.headers.get("Authorization", "")
    if header:
        return _key(request, header)
    user = request.user
    if not user.is_authenticated:
        return None, error(
            "session", "sign in first, or send Authorization: Bearer <a manage-scoped key>", 401
        )
    if write and (reason := _CsrfCheck(_unanswered).process_view(request, None, (), {})):
        fix = "send the csrftoken cookie's value in the X-CSRFToken header, from this origin"
        return None, error("csrf", f"CSRF verification failed ({reason}): {fix}", 403)
    if not (user.is_active and user.role in (Role.MEMBER, Role.ADMIN)):
        what = "deploy" if write else "use the API"
        return None, error("session", f"only team members and admins may {what}", 403)
    return user, None


def _key(request: HttpRequest, header: str) -> tuple[Any, JsonResponse | None]:
    presented = header.removeprefix(BEARER).strip() if header.startswith(BEARER) else ""
    key = keys.authenticate(presented, KeyScope.MANAGE) if presented else None
    if key is None:
        keys.record_denied(keys.parse_key(presented), "not a usable manage-scoped key (API)")
        return None, error(
            "key", "send Authorization: Bearer <key> with a usable key of scope 'manage'", 401
        )
    user = keys.KeyUser(key)
    request.user = user  # the audit context resolves the actor from the request
    return user, None
