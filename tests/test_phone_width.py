"""Every page of the console is usable on a phone: at 360 CSS pixels the document is no wider
than the viewport, without hiding what overflows, and the main navigation stays on screen.

The pages are filled the way people fill them (a registered model, an H100 host with a foreign
process, a deployment that failed with its diagnosis and long log lines, audit events), so a
long path, error line or table row would widen the page if the layout let it.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from accounts.models import Team, User
from audit.models import AuditEvent
from core.queues import get_queue
from deployments import services
from deployments.models import Deployment, EngineImage
from deployments.runtime import launcher
from deployments.runtime.diagnostics import diagnose
from deployments.states import State
from gpus import inventory
from gpus.hosts import register_host
from gpus.models import Host
from gpus.parsers import parse_query_csv
from gpus.readings import Collection, SourceFailure
from tests.asgi_console import signed_in_page
from tests.conftest import browser_login, screenshot
from tests.deployment_builders import engine_image, registered_model
from tests.model_dirs import write_model

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PHONE = {"width": 360, "height": 740}
FIXTURES = Path(__file__).parent / "fixtures"
H100 = FIXTURES / "gpu" / "h100-80gb"

LONG_ERROR = (
    "docker: Error response from daemon: failed to create task for container: failed to create "
    "shim task: OCI runtime create failed: runc create failed: unable to start container process:"
    "error during container init: error running hook #0: error running hook: exit status 1, "
    "stdout: , stderr: Auto-detected mode as 'legacy' nvidia-container-cli: initialization error:"
    "load library failed: libnvidia-ml.so.1:cannot_open_shared_object_file:no_such_file_or_dir"
)

# What would make the page wider than the viewport: the document's scroll width.
DOCUMENT_WIDTH = "() => document.documentElement.scrollWidth"
# Overflow hidden or clipped anywhere would hide what does not fit instead of fitting it: list
# every element whose content is wider than its box and which hides (or clips) the rest. The
# visually-hidden helper (1 px, for screen readers) is the one intended use.
CLIPPED = """() => [...document.querySelectorAll('*')].filter(el => {
    const style = getComputedStyle(el);
    const hides = ['hidden', 'clip'].includes(style.overflowX) || style.textOverflow === 'ellipsis';
    return hides && el.scrollWidth > el.clientWidth + 1
      && !el.classList.contains('visually-hidden');
  }).map(el => el.tagName + '.' + el.className + ': ' + el.textContent.trim().slice(0, 60))"""
# The top bar's white links must sit on its dark background: inside the header's box.
NAV_OUTSIDE_HEADER = """() => {
  const bar = document.querySelector('header.topbar').getBoundingClientRect();
  return [...document.querySelectorAll('header.topbar a, header.topbar button')].filter(el => {
    const r = el.getBoundingClientRect();
    return r.left < bar.left || r.right > bar.right || r.top < bar.top || r.bottom > bar.bottom;
  }).map(el => el.textContent.trim());
}"""
# Elements that stick out past the right edge of the viewport (for the failure message).
WIDE = """() => [...document.querySelectorAll('body *')]
  .filter(el => el.getBoundingClientRect().right > window.innerWidth + 1)
  .filter(el => !el.closest('.visually-hidden, .skip-link'))
  .map(el => el.tagName + '.' + el.className + ' ' + Math.round(el.getBoundingClientRect().right))
  .slice(0, 8)"""


@pytest.fixture
def console(admin: User, team_a: Team, tmp_path: Path) -> dict[str, Any]:
    """A console with something on every page: a model, a busy H100 host, a failed deployment
    (diagnosed from a real engine log) and the audit events all of that wrote."""
    write_model(tmp_path / "team-a" / "Llama-3.1-8B-Instruct-with-a-long-directory-name")
    model = registered_model(team_a, tmp_path, "Llama-3.1-8B-Instruct-with-a-long-directory-name")
    host = register_host("gpu-busy-with-a-long-host-name")[0]
    reading = parse_query_csv(
        (H100 / "nvidia-smi-query-busy.csv").read_text(),
        apps=(H100 / "nvidia-smi-compute-apps-busy.csv").read_text(),
    )
    inventory.store_collection(host, Collection(reading), timezone.now() - timedelta(seconds=1))
    dark = register_host("gpu-dark")[0]
    failures = (
        SourceFailure("nvml", "NVML: NVMLError_LibraryNotFound: NVML Shared Library Not Found"),
        SourceFailure("docker-nvidia-smi", LONG_ERROR),
    )
    inventory.store_collection(dark, Collection(None, failures))
    deployment = Deployment.objects.create(
        name="llama-8b-chat-for-the-support-team",
        team=team_a,
        model=model,
        host=host,
        image=engine_image(),
        gpu_count=1,
        requested_by=admin,
    )
    log = (FIXTURES / "vllm_logs" / "oom-wrapped.log").read_text()
    Deployment.objects.filter(pk=deployment.pk).update(log_tail=log.splitlines()[-40:])
    deployment.transition(State.QUEUED)
    deployment.transition(State.LAUNCHING)
    findings = [finding.as_json() for finding in diagnose(log)]
    launcher.fail(deployment, log.splitlines()[6], findings)
    return {"model": model, "host": host, "deployment": deployment, "team": team_a}


def _pages(console: dict[str, Any]) -> dict[str, str]:
    host: Host = console["host"]
    return {
        "dashboard": "/",
        "models": "/models/",
        "model detail": f"/models/{console['model'].pk}/",
        "register": "/models/register/",
        "deploy form": "/deployments/new/",
        "deployments": "/deployments/",
        "deployment detail": f"/deployments/{console['deployment'].public_id}/",
        "GPUs": "/gpus/",
        "host": f"/gpus/hosts/{host.name}/",
        "GPU": f"/gpus/hosts/{host.name}/0/",
        "team": f"/teams/{console['team'].slug}/",
        "audit": "/audit/",
        "audit event": f"/audit/events/{AuditEvent.objects.latest('seq').seq}/",
    }


@pytest.mark.redis
def test_a_deployment_of_replicas_and_a_replicas_page_fit_a_phone(
    browser: Any, asgi_url: str, admin: User, console: dict[str, Any]
) -> None:
    """The Replicas table (a row per replica, with its host, port, state and link) and a
    further replica's page, for two replicas requested through the deploy service."""
    stand_in = EngineImage.objects.create(
        name="stand-in", reference="berth/stand-in:test", gpu_capable=False, cpu_capable=True,
        is_stand_in=True,
    )  # fmt: skip
    request = services.DeployRequest(
        team=console["team"], model=console["model"], host=console["host"], image=stand_in,
        name="llama-8b-replicated-for-the-support-team", gpu_count=0, replicas=2,
        engine_args={"max_model_len": 2048},
    )  # fmt: skip
    deployment = services.request_deployment(admin, request)
    get_queue(console["host"].queue_name).empty()  # nothing launches: the pages are the point
    other = deployment.group().get(replica_index=1)
    pages = {"replicas": deployment.public_id, "replica 2": other.public_id}
    with signed_in_page(browser, asgi_url, admin, viewport=PHONE, name="phone") as page:
        for name, public_id in pages.items():
            assert page.goto(f"/deployments/{public_id}/").status == 200
            page.wait_for_load_state("load")
            assert page.evaluate(DOCUMENT_WIDTH) <= PHONE["width"], (name, page.evaluate(WIDE))
            assert page.evaluate(CLIPPED) == [], name
            screenshot(page, "phone-" + name.replace(" ", "-"))
        page.goto(f"/deployments/{deployment.public_id}/")
        assert page.locator("table.replicas tbody tr").count() == 2


def test_every_page_fits_a_360_px_phone_without_hiding_overflow(
    browser: Any, asgi_url: str, admin: User, console: dict[str, Any]
) -> None:
    too_wide, clipped, off_bar = {}, {}, {}
    with signed_in_page(browser, asgi_url, admin, viewport=PHONE, name="phone") as page:
        for name, path in _pages(console).items():
            response = page.goto(path)
            assert (response.status, page.url) == (200, asgi_url + path), name
            page.wait_for_load_state("load")
            if (width := page.evaluate(DOCUMENT_WIDTH)) > PHONE["width"]:
                too_wide[name] = (width, page.evaluate(WIDE))
            if hidden := page.evaluate(CLIPPED):
                clipped[name] = hidden
            if outside := page.evaluate(NAV_OUTSIDE_HEADER):
                off_bar[name] = outside
            screenshot(page, "phone-" + name.replace(" ", "-"))
    assert too_wide == {}
    assert clipped == {}
    assert off_bar == {}


def test_the_storage_mounts_table_fits_its_card_on_a_laptop(
    page: Any, admin: User, team_a: Team, tmp_path: Path
) -> None:
    """The demo's mount lives under the checkout (a long path without spaces) on all four
    columns: the table must still fit its card at 1440 px."""
    deep = tmp_path / "home" / "someone" / "src" / "berth-checkout" / "var" / "demo" / "models"
    write_model(deep / "team-a" / "tiny")
    registered_model(team_a, deep, "tiny")
    page.set_viewport_size({"width": 1440, "height": 900})
    browser_login(page, "root")
    page.wait_for_url("**/")
    page.goto("/models/")
    card = page.locator("#mounts").bounding_box()
    table = page.locator("#mounts table").bounding_box()
    assert table["x"] + table["width"] <= card["x"] + card["width"]
    assert page.evaluate(DOCUMENT_WIDTH) <= 1440
