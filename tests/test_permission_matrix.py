"""Who may open what, for every URL the console serves: the permission matrix.

The rows are checked against the URL resolver, so a new view without a row fails
``test_every_url_has_a_row``. Each row gives the status for alice (team A member; the objects
are team A's), bob (team B member: another team's object is a 404, never a 403), carol
(auditor: the audit trail only), admin and anonymous (302 = sent to the login page). POST-only
routes also answer GET with 405, so a GET never changes anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient, Client
from django.urls import URLPattern, URLResolver, get_resolver

import audit
from accounts.keys import KeySettings, create_api_key
from accounts.models import Team, User
from audit.actions import Action
from deployments.models import Deployment, EngineImage
from deployments.states import State
from tests.deployment_builders import host_with_gpus, registered_model
from tests.model_dirs import write_model

pytestmark = pytest.mark.django_db
PEOPLE = ("alice", "bob", "carol", "admin", "anonymous")
MEMBER_PAGE = (200, 200, 403, 200, 302)  # any member's page (shared or list filtered by team)
TEAM_A_PAGE = (200, 404, 403, 200, 302)  # a team A object
TEAM_A_ACTION = (302, 404, 403, 302, 302)  # a POST on a team A object (redirects when done)
REVIEWER_PAGE = (403, 403, 200, 200, 302)  # the audit trail
ADMIN_ONLY = (403, 403, 403, 302, 302)


@dataclass(frozen=True)
class Row:
    method: str
    expected: tuple[int, int, int, int, int]
    kwargs: Callable[[dict[str, Any]], dict[str, Any]] = lambda objects: {}
    data: dict[str, Any] = field(default_factory=dict)
    marks: tuple[Any, ...] = ()


def _deployment(objects: dict[str, Any]) -> dict[str, Any]:
    return {"public_id": objects["deployment"].public_id}


def _key(objects: dict[str, Any]) -> dict[str, Any]:
    return {"public_id": objects["api_key"].public_id}


# Route (as the resolver spells it) -> the requests made to it. Routes other helpers add are
# listed here too; a row for a route that does not exist (yet) is skipped, not failed.
ROWS: dict[str, list[Row]] = {
    "": [Row("get", (200, 200, 200, 200, 302))],
    "healthz": [Row("get", (200, 200, 200, 200, 200), marks=(pytest.mark.redis,))],
    "accounts/login/": [Row("get", (302, 302, 302, 302, 200))],
    "accounts/logout/": [Row("get", (405, 405, 405, 405, 302)), Row("post", (302,) * 5)],
    "teams/": [Row("get", MEMBER_PAGE)],
    "teams/<slug:slug>/": [Row("get", TEAM_A_PAGE, lambda o: {"slug": "team-a"})],
    "audit/": [Row("get", REVIEWER_PAGE)],
    "audit/verify/": [
        Row("get", (405, 405, 405, 405, 302)),
        Row("post", (403, 403, 302, 302, 302)),
    ],
    "audit/verify/status/": [Row("get", (403, 403, 400, 400, 302))],  # without ?after=
    "audit/events/<int:seq>/": [Row("get", REVIEWER_PAGE, lambda o: {"seq": o["event"].seq})],
    # Helper-added routes (audit exports, Prometheus metrics): reviewers / token or staff.
    "audit/export.csv": [Row("get", REVIEWER_PAGE)],
    "audit/export.jsonl": [Row("get", REVIEWER_PAGE)],
    "metrics": [Row("get", (403, 403, 403, 200, 401))],  # anonymous: no bearer token
    "gpus/": [Row("get", MEMBER_PAGE)],
    "gpus/hosts/<str:name>/": [Row("get", MEMBER_PAGE, lambda o: {"name": o["host"].name})],
    "gpus/hosts/<str:name>/<int:index>/": [
        Row("get", MEMBER_PAGE, lambda o: {"name": o["host"].name, "index": 0})
    ],
    "models/": [Row("get", MEMBER_PAGE)],
    "models/register/": [Row("get", MEMBER_PAGE)],
    "models/register/preview/": [
        Row("get", (405, 405, 405, 405, 302)),
        Row("post", MEMBER_PAGE),
    ],
    "models/<int:pk>/": [Row("get", TEAM_A_PAGE, lambda o: {"pk": o["model"].pk})],
    "models/<int:pk>/inspect/": [
        Row("get", (405, 405, 405, 405, 302), lambda o: {"pk": o["model"].pk}),
        Row("post", TEAM_A_ACTION, lambda o: {"pk": o["model"].pk}),
    ],
    "models/mounts/<int:pk>/sync/": [
        Row("get", (405, 405, 405, 405, 302), lambda o: {"pk": o["model"].mount_id}),
        Row("post", ADMIN_ONLY, lambda o: {"pk": o["model"].mount_id}),
    ],
    "deployments/": [Row("get", MEMBER_PAGE)],
    "deployments/new/": [Row("get", MEMBER_PAGE), Row("post", MEMBER_PAGE)],
    "deployments/new/plan/": [Row("get", (405, 405, 405, 405, 302)), Row("post", MEMBER_PAGE)],
    # An empty body is not JSON: 415 for those allowed to deploy; refusals answer in JSON.
    "deployments/api/": [
        Row("get", (200, 200, 403, 200, 401)),  # each caller's own deployments
        Row("post", (415, 415, 403, 415, 401)),
    ],
    "deployments/api/<uuid:public_id>/": [
        Row("get", (200, 404, 403, 200, 401), _deployment),
        Row("post", (405,) * 5, _deployment),
    ],
    "deployments/api/<uuid:public_id>/stop/": [
        Row("get", (405,) * 5, _deployment),
        # alice stops it; by the time the admin asks it is stopping already: 409.
        Row("post", (202, 404, 403, 409, 401), _deployment),
    ],
    "deployments/<uuid:public_id>/": [Row("get", TEAM_A_PAGE, _deployment)],
    "deployments/<uuid:public_id>/stream/": [Row("stream", TEAM_A_PAGE, _deployment)],
    **{
        f"deployments/<uuid:public_id>/{action}/": [
            Row("get", (405, 405, 405, 405, 302), _deployment),
            Row("post", TEAM_A_ACTION, _deployment),
        ]
        for action in ("stop", "restart", "delete")
    },
    # The scaling panel: a team A page; an empty policy form is shown again with its errors.
    "deployments/<uuid:public_id>/scaling/": [
        Row("get", TEAM_A_PAGE, _deployment),
        Row("post", (200, 404, 403, 200, 302), _deployment),
    ],
    # The gateway's pages: a team's keys and usage, a model's usage (team A's objects).
    "gateway/teams/<slug:slug>/": [
        Row("get", TEAM_A_PAGE, lambda o: {"slug": "team-a"}),
        Row("post", TEAM_A_PAGE, lambda o: {"slug": "team-a"}),  # empty form: shown again
    ],
    "gateway/teams/<slug:slug>/usage.csv": [Row("get", TEAM_A_PAGE, lambda o: {"slug": "team-a"})],
    "gateway/keys/<uuid:public_id>/revoke/": [
        Row("get", (405, 405, 405, 405, 302), _key),
        Row("post", TEAM_A_ACTION, _key),
    ],
    "gateway/keys/<uuid:public_id>/rotate/": [
        Row("get", (405, 405, 405, 405, 302), _key),
        # alice gets the new key (201); the admin then rotates a revoked key: sent back (302).
        Row("post", (201, 404, 403, 302, 302), _key),
    ],
    "gateway/models/<int:pk>/": [Row("get", TEAM_A_PAGE, lambda o: {"pk": o["model"].pk})],
}


def routes(patterns: list[Any] | None = None, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every route the resolver knows, with its pattern object, outside the Django admin."""
    for pattern in get_resolver().url_patterns if patterns is None else patterns:
        route = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            if getattr(pattern, "namespace", None) != "admin":
                yield from routes(pattern.url_patterns, route)
        elif isinstance(pattern, URLPattern):
            yield route, pattern


def admin_urls() -> list[str]:
    """The Django admin's URLs that take no arguments (index, lists, add forms, RQ dashboard)."""
    (site,) = [p for p in get_resolver().url_patterns if getattr(p, "namespace", "") == "admin"]
    return sorted(
        "/admin/" + route
        for route, pattern in routes(site.url_patterns)
        if not set(route) & set("<(^$?") and pattern.name not in ("login", "logout")
    )


def test_every_url_has_a_row() -> None:
    missing = sorted({route for route, _ in routes()} - set(ROWS))
    assert missing == [], f"add a row to ROWS for each new route: {missing}"


CASES = [
    pytest.param(route, row, id=f"{row.method}-{route or 'dashboard'}", marks=row.marks)
    for route, rows in ROWS.items()
    for row in rows
]


@pytest.fixture
def objects(
    people: dict[str, User | None], team_a: Team, tmp_path: Path, settings: Any
) -> dict[str, Any]:
    """Team A's model (on disk), a 1-GPU host, an image and a ready deployment; one audit event."""
    settings.BERTH_METRICS_TOKEN = ""
    write_model(tmp_path / "team-a" / "tiny")
    model = registered_model(team_a, tmp_path, "tiny")
    host = host_with_gpus(count=1)
    image = EngineImage.objects.create(name="vllm", reference="vllm/vllm-openai:v0.11.0")
    deployment = Deployment.objects.create(
        name="tiny", team=team_a, model=model, host=host, image=image, gpu_count=1,
        state=State.READY,
    )  # fmt: skip
    event = audit.record(Action.GC_RAN)
    api_key, _ = create_api_key(team_a, KeySettings("matrix"))
    return {
        "model": model,
        "host": host,
        "deployment": deployment,
        "event": event,
        "api_key": api_key,
    }


@pytest.mark.parametrize(("route", "row"), CASES)
def test_permission_matrix(
    route: str, row: Row, people: dict[str, User | None], objects: dict[str, Any]
) -> None:
    pattern = dict(routes()).get(route)
    if pattern is None:
        pytest.skip(f"/{route} is not served (yet)")
    path = "/" + route
    for name, value in row.kwargs(objects).items():
        path = path.replace(f"<{_converter(route, name)}:{name}>", str(value))
    got = tuple(_status(row, path, people[name]) for name in PEOPLE)
    assert got == row.expected, (
        f"{row.method.upper()} {path}: {dict(zip(PEOPLE, got, strict=True))}"
    )


def _converter(route: str, name: str) -> str:
    start = route.index(f":{name}>")
    return route[route.rindex("<", 0, start) + 1 : start]


def _status(row: Row, path: str, person: User | None) -> int:
    if row.method == "stream":
        return _stream_status(path, person)
    client = Client()
    if person is not None:
        client.force_login(person)
    return getattr(client, row.method)(path, row.data).status_code


@async_to_sync
async def _stream_status(path: str, person: User | None) -> int:
    client = AsyncClient()
    if person is not None:
        await client.aforce_login(person)
    response = await client.get(path)
    if response.streaming:
        await response.streaming_content.aclose()
    return response.status_code


@pytest.mark.parametrize("path", admin_urls())
def test_the_django_admin_is_for_admins_only(path: str, people: dict[str, User | None]) -> None:
    for name in ("alice", "bob", "carol", "anonymous"):
        client = Client()
        if people[name] is not None:
            client.force_login(people[name])
        response = client.get(path)
        assert response.status_code == 302, (name, path, response.status_code)
        assert response["Location"].startswith(("/admin/login/", "/accounts/login/")), (name, path)
    client = Client()
    client.force_login(people["admin"])
    assert client.get(path).status_code in (200, 403), path  # 403: a read-only model's add form
