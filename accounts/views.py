"""Team pages: members see their own teams, admins all of them, others none."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from accounts.access import get_visible_or_404, role_required, visible_teams
from accounts.models import Role, Team


@role_required(Role.MEMBER)
def team_list(request: HttpRequest) -> HttpResponse:
    teams = visible_teams(request.user).prefetch_related("members")
    return render(request, "accounts/team_list.html", {"teams": teams})


@role_required(Role.MEMBER)
def team_detail(request: HttpRequest, slug: str) -> HttpResponse:
    team = get_visible_or_404(Team.objects.all(), request.user, team_field="pk", slug=slug)
    members = team.members.order_by("username")
    return render(request, "accounts/team_detail.html", {"team": team, "members": members})
