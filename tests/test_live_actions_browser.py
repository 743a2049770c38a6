"""A deployment's page follows its live state in a real browser, without a reload: the actions,
the published port of the ``docker run`` line and the "ready after" line arrive with each push
over Server-Sent Events. Stop, Restart, Delete (which asks first), on the demo console's real
agent and Docker engine with the stand-in engine (NOT vLLM)."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect

from accounts.models import Team, User
from config.templatetags.berth_time import duration_since
from deployments import services
from deployments.models import Deployment, EngineImage
from gpus.models import Host
from models_registry import services as registry
from tests.asgi_console import signed_in_page

pytestmark = [
    pytest.mark.browser,
    pytest.mark.docker,
    pytest.mark.redis,
    pytest.mark.django_db(transaction=True),
]

DEMO_MODEL = "/demo/models/demo/tiny-llama"
READY_S = 60_000
NOT_RELOADED = "() => { window.__samePage = true; }"


def _deploy(demo_console: Host, replicas: int = 1) -> Deployment:
    """What the deploy form sends for the demo model on the stand-in engine, with 0 GPUs."""
    member = User.objects.get(username="demo")
    team = Team.objects.get(slug="demo")
    model = registry.register(member, team, DEMO_MODEL)
    request = services.DeployRequest(
        team=team,
        model=model,
        host=demo_console,
        image=EngineImage.objects.get(name="stand-in"),
        name="tiny-chat",
        gpu_count=0,
        replicas=replicas,
        engine_args={"max_model_len": 2048},
    )
    return services.request_deployment(member, request)


def test_stop_restart_delete_follow_the_pushed_state_without_a_reload(
    browser: Any, console_url: str, demo_console: Host
) -> None:
    deployment = _deploy(demo_console)
    member = User.objects.get(username="demo")
    with signed_in_page(browser, console_url, member, name="live-actions") as page:
        page.goto(f"/deployments/{deployment.public_id}/")
        page.evaluate(NOT_RELOADED)
        state = page.locator("#status [data-state]")
        actions = page.get_by_role("group", name="Actions")
        run_line = page.locator(".run-line")

        expect(state).to_have_attribute("data-state", "ready", timeout=READY_S)
        deployment.refresh_from_db()
        expect(actions.get_by_role("button")).to_have_text(["Stop"])
        expect(run_line).to_contain_text(f":{deployment.host_port}:8000")  # the published port
        expect(page.locator(".facts")).to_contain_text("after it was requested")

        actions.get_by_role("button", name="Stop").click()
        expect(state).to_have_attribute("data-state", "stopped", timeout=READY_S)
        expect(actions.get_by_role("button", name="Restart")).to_be_visible()
        expect(actions.get_by_text("Delete…")).to_be_visible()
        expect(actions.get_by_role("button", name="Stop")).to_have_count(0)

        actions.get_by_role("button", name="Restart").click()
        expect(page.locator("#status")).to_contain_text("generation 2")
        expect(state).to_have_attribute("data-state", "ready", timeout=READY_S)
        deployment.refresh_from_db()
        restarted = deployment.events.filter(generation=2).order_by("time", "id").first()
        since_restart = duration_since(deployment.ready_at, restarted.time)
        since_creation = duration_since(deployment.ready_at, deployment.created)
        assert since_restart != since_creation
        ready = page.locator(".facts dd", has_text="after it was requested")
        expect(ready).to_contain_text(f"{since_restart} after it was requested")
        expect(run_line).to_contain_text(f":{deployment.host_port}:8000")

        actions.get_by_role("button", name="Stop").click()
        expect(state).to_have_attribute("data-state", "stopped", timeout=READY_S)
        actions.get_by_text("Delete…").click()  # asks first
        actions.get_by_role("button", name="Delete deployment").click()
        gone = page.locator("#status")
        expect(gone).to_contain_text("This deployment was deleted", timeout=READY_S)
        expect(gone).to_contain_text("by demo")
        assert page.evaluate("window.__samePage") is True  # every step arrived pushed

        page.goto("/deployments/")
        expect(page.get_by_text("tiny-chat")).to_have_count(0)
    assert not Deployment.objects.filter(pk=deployment.pk).exists()


def test_the_replicas_table_follows_each_replica_and_links_its_own_page(
    browser: Any, console_url: str, demo_console: Host
) -> None:
    """Two replicas on the demo host: both rows reach ready and stop with the pushes (each
    replica publishes on its own channel; the first replica's page follows them all)."""
    deployment = _deploy(demo_console, replicas=2)
    member = User.objects.get(username="demo")
    with signed_in_page(browser, console_url, member, name="live-replicas") as page:
        page.goto(f"/deployments/{deployment.public_id}/")
        page.evaluate(NOT_RELOADED)
        rows = page.locator("table.replicas tbody tr")
        states = page.locator("table.replicas [data-replica-state]")
        actions = page.get_by_role("group", name="Actions")
        expect(rows).to_have_count(2)
        for index in range(2):
            expect(states.nth(index)).to_have_attribute(
                "data-replica-state", "ready", timeout=READY_S
            )
        expect(page.locator(".replica-count")).to_have_text("2/2 ready")
        expect(actions.get_by_role("button")).to_have_text(["Stop"])

        actions.get_by_role("button", name="Stop").click()
        for index in range(2):
            expect(states.nth(index)).to_have_attribute(
                "data-replica-state", "stopped", timeout=READY_S
            )
        expect(actions.get_by_role("button", name="Restart")).to_be_visible()
        expect(actions.get_by_text("Delete…")).to_be_visible()
        assert page.evaluate("window.__samePage") is True  # every step arrived pushed

        rows.nth(1).get_by_role("link").click()
        expect(page.get_by_text("This is replica 2 of")).to_be_visible()
        expect(page.locator("#status [data-state]")).to_have_attribute("data-state", "stopped")
        expect(page.get_by_role("group", name="Actions").get_by_role("button")).to_have_count(0)
