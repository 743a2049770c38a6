"""Who may open what: the permission matrix for every view, and object visibility by team."""

from __future__ import annotations

import pytest
from django.test import Client

import audit
from accounts.access import get_visible_or_404, visible_teams
from accounts.models import Team, User
from audit.actions import Action
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db

LOGIN = "/accounts/login/"
# path -> expected status for alice (team A member), bob (team B member), carol (auditor),
# admin, anonymous (302 = sent to the login page).
MATRIX = {
    "/": (200, 200, 200, 200, 302),
    "/models/": (200, 200, 403, 200, 302),
    "/gpus/": (200, 200, 403, 200, 302),
    "/deployments/": (200, 200, 403, 200, 302),
    "/teams/": (200, 200, 403, 200, 302),
    "/teams/team-a/": (200, 404, 403, 200, 302),
    "/teams/team-b/": (404, 200, 403, 200, 302),
    "/teams/no-such-team/": (404, 404, 403, 404, 302),
    "/audit/": (403, 403, 200, 200, 302),
    "/audit/events/1/": (403, 403, 200, 200, 302),
    "/admin/": (302, 302, 302, 200, 302),
    "/admin/audit/auditevent/": (302, 302, 302, 200, 302),
    "/admin/django_rq/dashboard/": (302, 302, 302, 200, 302),
    "/healthz": (None, None, None, None, None),  # open to load balancers; covered in test_pages
}
PEOPLE = ("alice", "bob", "carol", "admin", "anonymous")


def _client_for(person: User | None) -> Client:
    client = Client()
    if person is not None:
        client.force_login(person)
    return client


@pytest.mark.parametrize("path", [path for path, codes in MATRIX.items() if codes[0] is not None])
def test_permission_matrix(path: str, people: dict[str, User | None]) -> None:
    audit.record(Action.GC_RAN)  # so /audit/events/1/ exists
    got = tuple(_client_for(people[name]).get(path).status_code for name in PEOPLE)
    assert got == MATRIX[path], dict(zip(PEOPLE, got, strict=True))


def test_anonymous_is_sent_to_login_with_next(people: dict[str, User | None]) -> None:
    response = Client().get("/teams/team-a/")
    assert response["Location"] == f"{LOGIN}?next=/teams/team-a/"


def test_state_changing_audit_action_refuses_get_and_non_reviewers(
    people: dict[str, User | None],
) -> None:
    assert _client_for(people["carol"]).get("/audit/verify/").status_code == 405
    assert _client_for(people["alice"]).post("/audit/verify/").status_code == 403


def test_visible_teams_by_role(
    alice: User, bob: User, carol: User, admin: User, team_a: Team, team_b: Team
) -> None:
    assert list(visible_teams(alice)) == [team_a]
    assert list(visible_teams(bob)) == [team_b]
    assert list(visible_teams(carol)) == []
    assert set(visible_teams(admin)) == {team_a, team_b}


def test_get_visible_or_404_hides_other_teams_objects(alice: User, team_b: Team) -> None:
    from django.http import Http404

    with pytest.raises(Http404):
        get_visible_or_404(Team.objects.all(), alice, team_field="pk", slug="team-b")


def test_inactive_member_sees_nothing(alice: User, team_a: Team) -> None:
    alice.is_active = False
    alice.save()
    assert list(visible_teams(alice)) == []


def test_role_alone_decides_staff_rights(alice: User, admin: User) -> None:
    assert (alice.is_staff, alice.is_superuser) == (False, False)
    assert (admin.is_staff, admin.is_superuser) == (True, True)
    superuser = User.objects.create_superuser("boss", password=PASSWORD)
    assert superuser.role == "admin"
    alice.is_superuser = True  # a stray flag does not grant rights: the role decides
    alice.save()
    alice.refresh_from_db()
    assert alice.is_superuser is False
