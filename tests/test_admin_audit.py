"""Changes made in the Django admin are audited like any other action."""

from __future__ import annotations

import pytest
from django.test import Client

from accounts.models import Membership, Role, Team, User
from audit.models import AuditEvent

pytestmark = pytest.mark.django_db


def _inline(prefix: str, rows: list[dict[str, str]], initial: int = 0) -> dict[str, str]:
    data = {
        f"{prefix}-TOTAL_FORMS": str(len(rows)),
        f"{prefix}-INITIAL_FORMS": str(initial),
        f"{prefix}-MIN_NUM_FORMS": "0",
        f"{prefix}-MAX_NUM_FORMS": "1000",
    }
    for index, row in enumerate(rows):
        data.update({f"{prefix}-{index}-{key}": value for key, value in row.items()})
    return data


def test_team_created_with_a_member_and_the_member_removed_in_the_admin(
    admin: User, alice: User
) -> None:
    client = Client()
    client.force_login(admin)
    response = client.post(
        "/admin/accounts/team/add/",
        {
            "slug": "research",
            "name": "Research",
            "description": "",
            **_inline("memberships", [{"user": str(alice.pk)}]),
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    team = Team.objects.get(slug="research")
    assert list(team.members.all()) == [alice]
    actions = list(
        AuditEvent.objects.order_by("seq").values_list("action", "team_slug", "actor_name")
    )
    assert ("team.created", "research", "root") in actions
    assert ("team.member_added", "research", "root") in actions

    membership = Membership.objects.get(team=team)
    response = client.post(
        f"/admin/accounts/team/{team.pk}/change/",
        {
            "slug": "research",
            "name": "Research",
            "description": "",
            **_inline(
                "memberships",
                [{"id": str(membership.pk), "team": str(team.pk), "DELETE": "on"}],
                initial=1,
            ),
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    assert not team.members.exists()
    removed = AuditEvent.objects.get(action="team.member_removed")
    assert (removed.target_repr, removed.team_slug) == ("alice", "research")


def test_role_change_in_the_admin_is_audited_and_moves_staff_rights(
    admin: User, alice: User
) -> None:
    client = Client()
    client.force_login(admin)
    page = client.get(f"/admin/accounts/user/{alice.pk}/change/")
    assert page.status_code == 200
    response = client.post(
        f"/admin/accounts/user/{alice.pk}/change/",
        {
            "username": "alice",
            "role": Role.AUDITOR,
            "is_active": "on",
            "first_name": "",
            "last_name": "",
            "email": "",
            "last_login_0": "",
            "last_login_1": "",
            "date_joined_0": "2026-01-01",
            "date_joined_1": "00:00:00",
        },
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    alice.refresh_from_db()
    assert (alice.role, alice.is_staff) == ("auditor", False)
    event = AuditEvent.objects.get(action="account.role_changed")
    assert event.payload == {"old": "member", "new": "auditor"}


def test_team_quota_change_is_audited(admin: User, team_a: Team) -> None:
    client = Client()
    client.force_login(admin)
    response = client.post(
        f"/admin/accounts/team/{team_a.pk}/change/",
        {
            "slug": "team-a",
            "name": "Team A",
            "description": "",
            "gpu_quota": "8",
            **_inline("memberships", []),
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    event = AuditEvent.objects.get(action="team.quota_changed")
    assert event.payload == {"old": None, "new": 8}
