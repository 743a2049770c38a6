"""Who may see what. Every view loads objects through these helpers.

A team-owned model gets ``visible_to`` from :class:`TeamOwnedQuerySet`; views call
:func:`get_visible_or_404`, which answers 404 (not 403) for another team's object so ids of
other teams' objects leak nothing::

    deployment = get_visible_or_404(Deployment.objects, request.user, pk=pk)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.core.exceptions import PermissionDenied
from django.db import models
from django.http import Http404, HttpRequest, HttpResponse

from accounts.models import Role, Team


def team_ids(user: Any) -> list[int]:
    """The ids of the teams whose objects ``user`` acts on (none for auditors and anonymous)."""
    if not user.is_authenticated or not user.is_active or user.role != Role.MEMBER:
        return []
    cached = getattr(user, "_berth_team_ids", None)
    if cached is None:
        cached = list(user.memberships.values_list("team_id", flat=True))
        user._berth_team_ids = cached
    return cached


def visible[M: models.Model](
    queryset: models.QuerySet[M], user: Any, team_field: str = "team"
) -> models.QuerySet[M]:
    """Filter ``queryset`` to what ``user`` may see: everything for admins, their teams'
    objects for members, nothing for auditors (they read the audit trail only)."""
    if user.is_authenticated and user.is_active and user.role == Role.ADMIN:
        return queryset
    return queryset.filter(**{f"{team_field}__in": team_ids(user)})


class TeamOwnedQuerySet(models.QuerySet):
    """For models with a ``team`` foreign key: ``Model.objects.visible_to(user)``."""

    team_field = "team"

    def visible_to(self, user: Any) -> TeamOwnedQuerySet:
        return visible(self, user, self.team_field)


def visible_teams(user: Any) -> models.QuerySet[Team]:
    return visible(Team.objects.all(), user, team_field="pk")


def get_visible_or_404[M: models.Model](
    queryset: models.QuerySet[M], user: Any, team_field: str = "team", **lookup: Any
) -> M:
    """The object matching ``lookup`` if ``user`` may see it; 404 otherwise, whether it does not
    exist or belongs to another team."""
    try:
        return visible(queryset, user, team_field).get(**lookup)
    except queryset.model.DoesNotExist:
        raise Http404(f"No {queryset.model._meta.verbose_name} matches the given query.") from None


def role_required(
    *roles: Role,
) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """Allow a view to users holding one of ``roles`` (admins always pass); 403 for others."""
    allowed = {*roles, Role.ADMIN}

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            user = request.user
            if not (user.is_authenticated and user.is_active and user.role in allowed):
                raise PermissionDenied("Your role does not give access to this page.")
            return view(request, *args, **kwargs)

        return wrapped

    return decorator
