"""A deployment of several replicas in the console and the JSON API: lists show it once with
its replicas summarised, its page shows each replica (live), a further replica's page points
back to it and offers no action of its own, and the deploy form places replicas on any host."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from django.test import AsyncClient, Client
from django.utils import timezone

from accounts.models import Team, User
from audit.models import AuditEvent
from core.queues import get_queue
from deployments import services
from deployments.models import Deployment, EngineImage
from deployments.states import State
from gpus.models import Host, HostStatus
from tests.conftest import run_coroutine
from tests.deployment_builders import host_with_gpus, registered_model
from tests.model_dirs import write_model

API = "/deployments/api/"


def client_for(person: User) -> Client:
    client = Client()
    client.force_login(person)
    return client


@pytest.fixture
def setup(team_a: Team, tmp_path: Path) -> dict[str, Any]:
    """Team A's tiny model, a 4 x H100 host and the stand-in engine (CPU, holds nothing: any
    number of its replicas fit on one host)."""
    write_model(tmp_path / "team-a" / "tiny")
    model = registered_model(team_a, tmp_path, "tiny")
    model.config = json.loads((tmp_path / "team-a" / "tiny" / "config.json").read_text())
    model.save()
    stand_in = EngineImage.objects.create(
        name="stand-in",
        reference="berth/stand-in:test",
        gpu_capable=False,
        cpu_capable=True,
        is_stand_in=True,
    )
    return {"team": team_a, "model": model, "host": host_with_gpus(), "image": stand_in}


def request(user: User, setup: dict[str, Any], *, replicas: int, host: Host | None) -> Deployment:
    """What the deploy form sends for the stand-in with 0 GPUs, through the deploy service."""
    return services.request_deployment(
        user,
        services.DeployRequest(
            team=setup["team"],
            model=setup["model"],
            host=host,
            image=setup["image"],
            name="tiny",
            gpu_count=0,
            replicas=replicas,
            engine_args={"max_model_len": 2048},
        ),
    )


@pytest.fixture
def two_replicas(alice: User, setup: dict[str, Any]) -> Deployment:
    """Two replicas of ``tiny`` on gpu-01, queued by alice: the first ready, the second queued."""
    deployment = request(alice, setup, replicas=2, host=setup["host"])
    for state in (State.LAUNCHING, State.LOADING, State.READY):
        assert deployment.transition(state)
    return deployment


def second(deployment: Deployment) -> Deployment:
    return deployment.group().select_related("host").get(replica_index=1)


def online(host: Host) -> Host:
    """The host as its agent keeps it: online, with a fresh heartbeat (placement may choose it)."""
    now = timezone.now()
    Host.objects.filter(pk=host.pk).update(
        status=HostStatus.ONLINE, last_heartbeat=now, last_collected=now
    )
    host.refresh_from_db()
    return host


def buttons(html: str) -> list[str]:
    """The page's action buttons (the group the status pushes)."""
    actions = html.split('aria-label="Actions"')[1].split("</div>")[0]
    return re.findall(r'<button type="submit"[^>]*>([^<]+)</button>', actions)


@pytest.mark.django_db
def test_lists_show_a_deployment_once_with_its_replicas_summarised(
    alice: User, two_replicas: Deployment
) -> None:
    assert Deployment.objects.count() == 2
    client = client_for(alice)
    listing = client.get("/deployments/").content.decode()
    assert listing.count("team-a/tiny") == 1
    assert listing.count('class="state state-') == 1
    assert "1/2 ready · 1 queued" in listing
    assert "gpu-01 (2)" in listing
    assert '<code title="http' in listing  # the name answers: one replica is ready

    dashboard = client.get("/").content.decode()
    assert dashboard.count("team-a/tiny") == 1
    assert "1 ready" in dashboard
    assert "queued</span>" not in dashboard.split("state-summary")[1].split("</p>")[0]
    assert "1/2 ready · 1 queued" in dashboard

    results = client.get(API).json()["results"]
    assert [(r["name"], r["state"], r["replicas"], r["ready_replicas"]) for r in results] == [
        ("tiny", "ready", 2, 1)
    ]
    assert results[0]["hosts"] == ["gpu-01"]
    assert results[0]["id"] == str(two_replicas.public_id)


@pytest.mark.django_db
def test_metrics_count_deployments_once_and_replicas_each(
    two_replicas: Deployment, settings: Any
) -> None:
    settings.BERTH_METRICS_TOKEN = "t" * 32
    text = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer " + "t" * 32).content.decode()
    assert 'berth_deployments{state="ready"} 1.0' in text
    assert 'berth_deployments{state="queued"} 0.0' in text
    assert 'berth_deployment_replicas{state="ready"} 1.0' in text
    assert 'berth_deployment_replicas{state="queued"} 1.0' in text


@pytest.mark.django_db
def test_the_page_shows_each_replica_and_each_replica_page_points_back(
    alice: User, two_replicas: Deployment
) -> None:
    client = client_for(alice)
    other = second(two_replicas)
    page = client.get(f"/deployments/{two_replicas.public_id}/").content.decode()
    table = page.split('class="replicas"')[1].split("</table>")[0]
    rows = re.findall(r'<tr data-replica="(\d)">(.*?)</tr>', table, re.S)
    assert [number for number, _ in rows] == ["1", "2"]
    assert 'data-replica-state="ready"' in rows[0][1]
    assert 'data-replica-state="queued"' in rows[1][1]
    assert all("gpu-01" in row and "none (CPU engine)" in row for _, row in rows)
    assert f'href="/deployments/{other.public_id}/"' in rows[1][1]
    assert 'data-state="ready"' in page  # the deployment's state: one replica serves
    assert "1/2 ready · 1 queued" in page
    assert buttons(page) == ["Stop"]

    replica_page = client.get(f"/deployments/{other.public_id}/").content.decode()
    assert "This is replica 2 of" in replica_page
    assert f'href="/deployments/{two_replicas.public_id}/"' in replica_page
    assert 'data-state="queued"' in replica_page
    assert buttons(replica_page) == []
    assert 'class="replicas"' not in replica_page


@pytest.mark.django_db
def test_actions_follow_every_replica_as_the_services_act(
    alice: User, two_replicas: Deployment
) -> None:
    client = client_for(alice)
    url = f"/deployments/{two_replicas.public_id}/"
    other = second(two_replicas)
    assert other.transition(State.FAILED, message="engine exited")
    # One serves, one failed: stop the running one, or restart the failed one beside it.
    assert buttons(client.get(url).content.decode()) == ["Stop", "Restart"]

    assert client.post(f"{url}stop/").status_code == 302
    for row in two_replicas.group():
        if row.state == State.STOPPING:
            assert row.transition(State.STOPPED)
    page = client.get(url).content.decode()
    assert buttons(page) == ["Restart", "Delete deployment"]  # all ended: Delete too
    assert 'data-replica-state="stopped"' in page
    assert 'data-replica-state="failed"' in page

    assert client.post(f"{url}restart/", follow=True).status_code == 200
    assert sorted(two_replicas.group().values_list("state", flat=True)) == ["queued", "queued"]
    assert buttons(client.get(url).content.decode()) == ["Stop"]


@pytest.mark.django_db
def test_a_further_replicas_own_address_refuses_actions_naming_the_deployment(
    alice: User, two_replicas: Deployment
) -> None:
    client = client_for(alice)
    other = second(two_replicas)
    for action in ("stop", "restart", "delete"):
        response = client.post(f"/deployments/{other.public_id}/{action}/", follow=True)
        assert "stop, restart and delete act on the whole deployment" in response.content.decode()
    api = client.post(f"{API}{other.public_id}/stop/")
    assert api.status_code == 409
    assert str(two_replicas.public_id) in api.json()["errors"]["state"]
    assert sorted(two_replicas.group().values_list("state", flat=True)) == ["queued", "ready"]
    denied = AuditEvent.objects.filter(outcome="denied", target_id=str(other.pk))
    assert denied.count() == 4


@pytest.mark.django_db
def test_the_json_api_detail_lists_every_replica(alice: User, two_replicas: Deployment) -> None:
    client = client_for(alice)
    other = second(two_replicas)
    document = client.get(f"{API}{two_replicas.public_id}/").json()
    assert (document["replicas"], document["ready_replicas"], document["state"]) == (2, 1, "ready")
    replicas = document["replica_status"]
    assert [(r["index"], r["host"], r["state"], r["gpus"]) for r in replicas] == [
        (0, "gpu-01", "ready", []),
        (1, "gpu-01", "queued", []),
    ]
    assert replicas[1]["id"] == str(other.public_id)
    assert {"port", "diagnosis", "last_error", "ready_at", "generation", "url"} <= set(replicas[1])

    own = client.get(f"{API}{other.public_id}/").json()
    assert (own["index"], own["state"], own["replica_of"]) == (1, "queued", document["id"])
    assert own == {"name": "tiny", "team": "team-a", **replicas[1], "replica_of": document["id"]}


@pytest.mark.django_db
def test_the_form_places_replicas_on_any_host_and_says_where(
    alice: User, setup: dict[str, Any], django_capture_on_commit_callbacks: Any
) -> None:
    online(setup["host"])
    online(host_with_gpus("gpu-02", count=2))
    client = client_for(alice)
    form = client.get("/deployments/new/").content.decode()
    assert "Any host (Berth places each replica)" in form
    assert 'name="replicas"' in form
    data = {
        "name": "tiny", "team": setup["team"].pk, "model": setup["model"].pk, "host": "",
        "replicas": "2", "image": setup["image"].pk, "gpu_count": "0", "max_model_len": "2048",
        "kv_cache_dtype": "auto", "dtype": "auto", "environment": "",
    }  # fmt: skip
    with django_capture_on_commit_callbacks(execute=False) as enqueued:
        response = client.post("/deployments/new/", data, follow=True)
    assert "Deployment tiny: 2 replicas queued on gpu-01, gpu-02." in response.content.decode()
    assert enqueued  # each replica's launch, on its host's queue once committed
    assert sorted(Deployment.objects.values_list("replica_index", "host__name")) == [
        (0, "gpu-01"),
        (1, "gpu-02"),
    ]


@pytest.mark.redis
@pytest.mark.django_db
def test_the_json_api_places_replicas_when_host_is_null_and_says_where(
    alice: User, setup: dict[str, Any], django_capture_on_commit_callbacks: Any
) -> None:
    hosts = [online(setup["host"]), online(host_with_gpus("gpu-02", count=2))]
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    client.get("/deployments/new/")  # the CSRF cookie, as a page of the console would have it
    body = {
        "team": "team-a", "model": setup["model"].pk, "host": None, "replicas": 2,
        "image": "stand-in", "name": "tiny", "gpu_count": 0,
        "engine_args": {"max_model_len": 2048},
    }  # fmt: skip
    try:
        with django_capture_on_commit_callbacks(execute=True):
            response = client.post(
                API,
                json.dumps(body),
                content_type="application/json",
                HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value,
            )
        assert response.status_code == 201, response.content
        document = response.json()
        assert (document["replicas"], document["hosts"]) == (2, ["gpu-01", "gpu-02"])
        rows = Deployment.objects.get(public_id=document["id"]).group()
        for row, host in zip(rows, hosts, strict=True):
            assert get_queue(host.queue_name).job_ids == [f"launch-{row.pk}-1"]
    finally:
        for host in hosts:
            get_queue(host.queue_name).empty()


@pytest.mark.django_db
def test_the_plan_without_a_host_is_shown_for_each_online_host(
    alice: User, setup: dict[str, Any]
) -> None:
    client = client_for(alice)
    vllm = EngineImage.objects.create(name="vllm", reference="vllm/vllm-openai:v0.11.0")
    data = {
        "name": "tiny", "team": setup["team"].pk, "model": setup["model"].pk, "host": "",
        "replicas": "3", "image": vllm.pk, "gpu_count": "", "max_model_len": "2048",
        "kv_cache_dtype": "auto", "dtype": "auto", "environment": "",
    }  # fmt: skip
    nowhere = client.post("/deployments/new/plan/", data).content.decode()
    assert "No host is online" in nowhere

    online(setup["host"])
    online(host_with_gpus("gpu-02", count=2))
    html = client.post("/deployments/new/plan/", data).content.decode()
    assert "plans each of the 3 replicas again for the host it lands on" in html
    verdicts = re.findall(r"<li><strong>(gpu-0\d)</strong>: (.*?)</li>", html)
    assert [(host, "fits" in verdict) for host, verdict in verdicts] == [
        ("gpu-01", True),
        ("gpu-02", True),
    ]
    assert "The plan on gpu-01" in html
    assert html.count('class="gpu-bar"') == 1

    chosen = client.post("/deployments/new/plan/", {**data, "host": setup["host"].pk})
    assert "3 replicas on gpu-01, each on GPUs of its own" in chosen.content.decode()


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_the_first_replicas_stream_pushes_every_replicas_change(
    alice: User, setup: dict[str, Any]
) -> None:
    deployment = request(alice, setup, replicas=2, host=setup["host"])
    other = second(deployment)
    try:
        run_coroutine(_stream_check(alice, deployment, other))
    finally:
        get_queue(setup["host"].queue_name).empty()


async def _stream_check(alice: User, deployment: Deployment, other: Deployment) -> None:
    from asgiref.sync import sync_to_async
    from django.db import connections

    try:
        client = AsyncClient()
        await sync_to_async(client.force_login)(alice)
        response = await client.get(f"/deployments/{deployment.public_id}/stream/")
        chunks = response.streaming_content
        first = (await anext(chunks)).decode()
        assert 'data-replica-state="queued"' in first
        await sync_to_async(other.transition)(State.FAILED, message="engine exited")
        pushed = (await anext(chunks)).decode()
        assert 'data-replica-state="failed"' in pushed  # replica 2's change, on replica 1's page
        assert ">Restart</button>" in pushed
        await chunks.aclose()
    finally:
        await sync_to_async(connections.close_all)()
