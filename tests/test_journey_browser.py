"""The first-run journey in a real browser, as a new member and then an auditor would live it.

On a console prepared by ``manage.py berth_demo`` (what ``BERTH_DEMO=1 make run`` runs): sign
in, register the demo model (its inspection shows while typing), open the deploy form (the plan
answers), deploy on the stand-in engine (NOT vLLM), watch the page go loading → ready through
the stream without a reload, read the ``docker run`` line, stop it, then find every step in the
audit review as the auditor. The console is served over ASGI (uvicorn, as ``make run`` does),
the host's real agent runs the launches, the engine runs in the real Docker engine. The README's
screenshots are taken here.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import expect

from accounts.models import User
from audit.models import AuditEvent
from deployments.models import Deployment
from gpus.models import Host
from models_registry.models import Model
from tests.conftest import (
    BASE_DIR,
    PASSWORD,
    browser_login,
    screenshot,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.docker,
    pytest.mark.redis,
    pytest.mark.django_db(transaction=True),
]

DEMO_MODEL = "/demo/models/demo/tiny-llama"
README_SCREENSHOTS = {
    "journey-dashboard": "dashboard.png",
    "journey-deployment-loading": "deployment-loading.png",
}
# Counts the status pushes the page receives over Server-Sent Events (htmx's SSE extension
# fires htmx:sseMessage for each); the marker only survives if the page never reloads.
WATCH_STREAM = """() => {
  window.__journey = 'same page';
  window.__pushes = 0;
  document.body.addEventListener('htmx:sseMessage', () => { window.__pushes += 1; });
}"""


@pytest.fixture
def console_page(browser: Any, console_url: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A browser page on the ASGI console; console errors fail the test, as ``page`` does."""
    context = browser.new_context(base_url=console_url, viewport={"width": 1280, "height": 800})
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors: list[str] = []
    page.on(
        "console", lambda message: errors.append(message.text) if message.type == "error" else None
    )
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        screenshot(page, f"failed-{request.node.name}")
    context.close()
    assert errors == [], f"browser console errors: {errors}"


def test_a_new_member_deploys_the_demo_model_and_the_auditor_finds_every_step(
    console_page: Any, demo_console: Host, carol: User
) -> None:
    page = console_page
    carol.set_password(PASSWORD)  # hashed again with the console's hashers
    carol.save()
    browser_login(page, "demo")
    expect(page.get_by_role("heading", name="Your first deployment")).to_be_visible()

    # Register the model: the inspection shows while the path is typed, then on its page.
    page.get_by_role("link", name="Register a model").first.click()
    page.get_by_label("Path").fill(DEMO_MODEL)
    expect(page.locator("#preview")).to_contain_text("Deployable")
    expect(page.locator("#preview")).to_contain_text("LlamaForCausalLM")
    page.get_by_role("button", name="Register and inspect").click()
    expect(page.get_by_role("heading", name="tiny-llama")).to_be_visible()
    expect(page.get_by_text("LlamaForCausalLM")).to_be_visible()
    model = Model.objects.get()

    # The deploy form: the plan answers as the form changes.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Deployments").click()
    page.get_by_role("link", name="Deploy a model").first.click()
    page.locator("#id_name").fill("tiny-chat")
    page.locator("#id_model").select_option(str(model.pk))
    page.locator("#id_host").select_option(str(demo_console.pk))
    page.locator("#id_image").select_option(label="stand-in (" + _stand_in_reference() + ")")
    page.locator("#id_max_model_len").fill("2048")
    plan = page.locator("#plan")
    # This laptop-like host has no GPU: GPUs is 0, and the planner says what the model would
    # need on one common card instead.
    expect(page.locator("#id_gpu_count")).to_have_value("0")
    expect(plan).to_contain_text("a CPU engine, nothing to plan on this host.")
    expect(plan).to_contain_text("1 \u00d7 24 GiB: fits")
    screenshot(page, "journey-deploy-form")

    # Deploy, then watch the same page go loading -> ready, pushed over SSE.
    page.get_by_role("button", name="Deploy").click()
    page.wait_for_url("**/deployments/*-*-*/")
    page.evaluate(WATCH_STREAM)
    state = page.locator("#status [data-state]")
    expect(page.get_by_text("stand-in engine")).to_be_visible()
    expect(state).to_have_attribute("data-state", "loading", timeout=30_000)
    expect(page.get_by_label("Start-up in progress")).to_be_visible()
    screenshot(page, "journey-deployment-loading")
    expect(state).to_have_attribute("data-state", "ready", timeout=30_000)
    assert page.evaluate("window.__journey") == "same page"
    assert page.evaluate("window.__pushes") >= 2  # at least loading and ready arrived pushed
    expect(page.locator(".facts")).to_contain_text("after it was requested")
    expect(page.locator(".run-line")).to_contain_text("docker run --detach")
    expect(page.locator(".timeline")).to_contain_text("the engine answers /health")
    screenshot(page, "journey-deployment-ready")

    page.get_by_role("link", name="Dashboard").click()
    expect(page.get_by_role("link", name="demo/tiny-chat")).to_be_visible()
    expect(page.get_by_text("Waiting for its agent")).to_have_count(0)  # the agent is alive
    screenshot(page, "journey-dashboard")

    page.get_by_role("link", name="demo/tiny-chat").click()
    page.get_by_role("button", name="Stop").click()
    expect(state).to_have_attribute("data-state", "stopped", timeout=30_000)
    deployment = Deployment.objects.get()
    assert deployment.container_id

    # The auditor finds each step of the journey in the review.
    page.get_by_role("button", name="Sign out").click()
    browser_login(page, "carol")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Audit").click()
    rows = page.locator("#audit-rows")
    for action in (
        "model.registered",
        "deployment.launch_requested",
        "deployment.state_changed",
        "deployment.stop_requested",
    ):
        expect(rows.get_by_text(action, exact=True).first).to_be_visible()
    for new_state in ("launching", "ready", "stopped"):
        event = AuditEvent.objects.get(
            action="deployment.state_changed", payload_json__contains=f'"new":"{new_state}"'
        )
        page.goto(f"/audit/events/{event.seq}/")
        expect(page.locator(".payload")).to_contain_text(f'"new": "{new_state}"')
        expect(page.get_by_text(deployment.name).first).to_be_visible()
    screenshot(page, "journey-audit-event")
    _publish_readme_screenshots()


def _stand_in_reference() -> str:
    from deployments.models import EngineImage

    return EngineImage.objects.get(name="stand-in").reference


def _publish_readme_screenshots() -> None:
    """The README shows what this test saw: copy its screenshots to ``docs/screenshots/``."""
    target = BASE_DIR / "docs" / "screenshots"
    target.mkdir(parents=True, exist_ok=True)
    for name, readme_name in README_SCREENSHOTS.items():
        shutil.copyfile(
            BASE_DIR / "artifacts" / "screenshots" / f"{name}.png", target / readme_name
        )
