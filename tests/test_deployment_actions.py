"""The actions a deployment's page offers follow its state; a delete is shown as under way until
the host's agent has removed the deployment; a deleted deployment's URL says it was deleted,
when and by whom — to those who could see it."""

from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections
from django.middleware.csrf import _does_token_match
from django.test import AsyncClient, Client

from accounts.models import Team, User
from core.queues import get_queue
from deployments.changes import publish
from deployments.models import Deployment, EngineImage, GpuAllocation
from deployments.states import State
from deployments.web.views import CSRF_SLOT
from tests.conftest import run_manage, subprocess_env
from tests.deployment_builders import host_with_gpus, registered_model
from tests.model_dirs import write_model

pytestmark = pytest.mark.django_db


@pytest.fixture
def deployment(team_a: Team, tmp_path: Path) -> Deployment:
    """Team A's tiny model on a 1-GPU host, as vLLM would run it (nothing is launched here)."""
    write_model(tmp_path / "team-a" / "tiny")
    model = registered_model(team_a, tmp_path, "tiny")
    model.config = json.loads((tmp_path / "team-a" / "tiny" / "config.json").read_text())
    model.save()
    return Deployment.objects.create(
        name="tiny",
        team=team_a,
        model=model,
        host=host_with_gpus(count=1),
        image=EngineImage.objects.create(name="vllm", reference="vllm/vllm-openai:v0.11.0"),
        gpu_count=1,
    )


def client_for(person: User) -> Client:
    client = Client()
    client.force_login(person)
    return client


def _buttons(html: str) -> list[str]:
    actions = html.split('aria-label="Actions"', 1)[1].split("</div>", 1)[0]
    return [word for word in ("Stop", "Restart", "Delete…") if f">{word}<" in actions]


@pytest.mark.parametrize(
    ("state", "buttons"),
    [
        (State.QUEUED, ["Stop"]),
        (State.LOADING, ["Stop"]),
        (State.READY, ["Stop"]),
        (State.STOPPING, []),
        (State.FAILED, ["Restart", "Delete…"]),  # no Stop for a failed deployment
        (State.STOPPED, ["Restart", "Delete…"]),
    ],
)
def test_the_pushed_status_offers_the_actions_of_its_state(
    alice: User, deployment: Deployment, state: State, buttons: list[str]
) -> None:
    Deployment.objects.filter(pk=deployment.pk).update(state=state)
    status = client_for(alice).get(
        f"/deployments/{deployment.public_id}/", headers={"HX-Request": "true"}
    )
    assert _buttons(status.content.decode()) == buttons
    # ...and the values of the docker run line that change (the line itself is built once).
    assert 'hx-swap-oob="innerHTML:.run-line-port">0</span>' in status.content.decode()


@pytest.mark.redis
def test_a_delete_under_way_is_shown_and_refuses_a_restart(
    alice: User, deployment: Deployment, django_capture_on_commit_callbacks: Any
) -> None:
    Deployment.objects.filter(pk=deployment.pk).update(state=State.STOPPED)
    client = client_for(alice)
    queue = get_queue(deployment.host.queue_name)
    queue.empty()
    with django_capture_on_commit_callbacks(execute=True):
        answer = client.post(
            f"/deployments/{deployment.public_id}/delete/", headers={"HX-Request": "true"}
        )
    assert "Deleting tiny" in answer.content.decode()  # a notice beside the status
    listing = client.get("/deployments/").content.decode()
    assert "Deleting" in listing
    assert "Stopped" not in listing
    page = client.get(f"/deployments/{deployment.public_id}/").content.decode()
    assert "Being deleted since" in page
    assert _buttons(page) == []
    refused = client.post(
        f"/deployments/{deployment.public_id}/restart/", headers={"HX-Request": "true"}
    )
    assert "being deleted" in refused.content.decode()
    assert queue.count == 1  # the delete only
    queue.empty()


@pytest.mark.redis
@pytest.mark.docker
@pytest.mark.django_db(transaction=True)
def test_a_deleted_deployments_url_says_who_deleted_it_to_those_who_may_know(
    alice: User, bob: User, admin: User, deployment: Deployment
) -> None:
    """Deleted the way the page does it: alice asks, the host's worker deletes (carrying her
    name into the audit trail)."""
    Deployment.objects.filter(pk=deployment.pk).update(state=State.STOPPED)
    url = f"/deployments/{deployment.public_id}/"
    get_queue(deployment.host.queue_name).empty()
    assert client_for(alice).post(f"{url}delete/").status_code == 302
    worker = run_manage("berth_worker", deployment.host.queue_name, "--burst", env=subprocess_env())
    assert worker.returncode == 0, worker.stderr
    assert not Deployment.objects.filter(pk=deployment.pk).exists()
    for person in (alice, admin):
        response = client_for(person).get(url)
        assert response.status_code == 410
        assert "This deployment was deleted" in response.content.decode()
        assert "by alice" in response.content.decode()
    polled = client_for(alice).get(url, headers={"HX-Request": "true"})
    assert polled.status_code == 286  # htmx stops polling, and shows why
    assert "by alice" in polled.content.decode()
    other = client_for(bob).get(url)
    assert other.status_code == 404  # another team cannot tell it from one that never existed
    assert "alice" not in other.content.decode()


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_pushed_status_carries_each_viewers_own_csrf_token(
    alice: User, admin: User, deployment: Deployment
) -> None:
    """The status is rendered once per change for all viewers; its action forms must still
    carry each viewer's CSRF token (a shared one would not pass, and would leak)."""
    Deployment.objects.filter(pk=deployment.pk).update(state=State.STOPPED)
    # A fresh event loop in its own thread: a browser test's Playwright loop may run in this one.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, _two_viewers(alice, admin, deployment)).result(timeout=60)


async def _two_viewers(alice: User, admin: User, deployment: Deployment) -> None:
    try:
        viewers = []
        for person in (alice, admin):
            client = AsyncClient()
            await sync_to_async(client.force_login)(person)
            response = await client.get(f"/deployments/{deployment.public_id}/stream/")
            first = await anext(response.streaming_content)
            viewers.append((client, response.streaming_content, first))
        await sync_to_async(publish)(deployment.pk)  # one change, one shared render
        for client, chunks, first in viewers:
            pushed = (await anext(chunks)).decode()
            for html in (first.decode(), pushed):
                assert "Restart" in html
                assert CSRF_SLOT not in html
                tokens = re.findall(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
                assert len(tokens) == 2  # Restart and Delete
                secret = client.cookies[settings.CSRF_COOKIE_NAME].value
                assert all(_does_token_match(token, secret) for token in tokens)
            await chunks.aclose()
    finally:
        # PostgreSQL cannot drop a test database someone is still connected to.
        await sync_to_async(connections.close_all)()


def test_the_run_line_marks_what_the_pushed_status_fills_in(
    alice: User, deployment: Deployment
) -> None:
    """Built once per page, before the launch: port 0 and GPUs to be reserved; the pushed
    status then carries the port, generation and GPU ids that htmx swaps into the marks."""
    client = client_for(alice)
    page = client.get(f"/deployments/{deployment.public_id}/").content.decode()
    line = page.split('<pre class="run-line">', 1)[1].split("</pre>", 1)[0]
    assert ':<span class="run-line-port">0</span>:8000' in line
    assert '&quot;device=<span class="run-line-gpus">?</span>&quot;' in line
    assert '-g<span class="run-line-generation">1</span> ' in line
    gpu = deployment.host.gpus.get()
    GpuAllocation.objects.create(deployment=deployment, gpu=gpu, generation=1)
    Deployment.objects.filter(pk=deployment.pk).update(state=State.LOADING, host_port=30123)
    status = client.get(
        f"/deployments/{deployment.public_id}/", headers={"HX-Request": "true"}
    ).content.decode()
    assert '<span hx-swap-oob="innerHTML:.run-line-port">30123</span>' in status
    assert f'<span hx-swap-oob="innerHTML:.run-line-gpus">{gpu.uuid}</span>' in status


def test_list_and_dashboard_show_a_ready_deployments_endpoint(
    alice: User, deployment: Deployment, settings: Any
) -> None:
    settings.BERTH_GATEWAY_URL = "https://llm.example.com/"
    client = client_for(alice)
    for page in ("/deployments/", "/"):
        assert (
            '<code title="https://llm.example.com/v1">tiny</code>'
            not in client.get(page).content.decode()
        )
    Deployment.objects.filter(pk=deployment.pk).update(state=State.READY)
    for page in ("/deployments/", "/"):
        html = client.get(page).content.decode()
        assert "<code>https://llm.example.com/v1</code>" in html, page
        assert '<code title="https://llm.example.com/v1">tiny</code>' in html, page
