"""The console in a real browser (Debian's Chromium through Playwright)."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect

from accounts.models import User
from audit.models import AuditEvent
from core.queues import get_queue
from tests.conftest import browser_login, run_manage, screenshot, subprocess_env

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_member_logs_in_and_sees_the_dashboard(page: Any, alice: User) -> None:
    page.goto("/")
    assert page.url.endswith("/accounts/login/?next=/")
    browser_login(page, "alice")
    page.wait_for_url("**/")
    assert page.get_by_role("heading", name="Dashboard").is_visible()
    assert page.get_by_role("heading", name="Your teams").is_visible()
    assert page.get_by_role("link", name="Team A").is_visible()
    nav = page.get_by_role("navigation", name="Main")
    assert [link.inner_text() for link in nav.get_by_role("link").all()] == [
        "Dashboard",
        "Models",
        "GPUs",
        "Deployments",
        "Teams",
    ]
    screenshot(page, "dashboard-member")
    assert AuditEvent.objects.filter(action="auth.login", actor_name="alice").count() == 1


def test_auditor_pages_through_the_audit_review_without_reloading(
    page: Any, carol: User, admin: User
) -> None:
    import audit
    from audit.actions import Action

    for index in range(60):
        audit.record(Action.GC_RAN, run=index)
    browser_login(page, "carol")
    page.wait_for_url("**/")
    page.get_by_role("link", name="Audit", exact=True).click()
    page.wait_for_url("**/audit/")
    rows = page.locator("#audit-rows tr:not(#more-row)")
    assert rows.count() == 50
    page.evaluate("window.__notReloaded = true")
    page.get_by_role("link", name="Older events").click()
    expect(rows).to_have_count(AuditEvent.objects.count())
    assert page.evaluate("window.__notReloaded") is True  # htmx swapped rows in; no navigation
    screenshot(page, "audit-review")


def test_failed_sign_in_shows_the_reason(page: Any, alice: User) -> None:
    browser_login(page, "alice", "not-the-password")
    assert (
        page.get_by_role("alert")
        .inner_text()
        .startswith("Please enter a correct username and password")
    )


@pytest.mark.redis
def test_verify_chain_reports_its_result_in_place(page: Any, carol: User) -> None:
    """The badge follows the job: queued (no worker yet), then the result once the default
    worker has run it — on the same page, without a reload."""
    get_queue("default").empty()
    browser_login(page, "carol")
    page.wait_for_url("**/")
    page.goto("/audit/")
    page.evaluate("window.__notReloaded = true")
    status = page.locator("#chain-status")
    expect(status).to_contain_text("Never verified")
    page.get_by_role("button", name="Verify chain").click()
    expect(status).to_contain_text("waiting for the default worker")
    worker = run_manage("berth_worker", "default", "--burst", env=subprocess_env())
    assert worker.returncode == 0, worker.stdout + worker.stderr
    expect(status).to_contain_text("Verified", timeout=10_000)
    expect(status).to_contain_text("events intact")
    assert page.evaluate("window.__notReloaded") is True
    assert AuditEvent.objects.filter(action="audit.verified", outcome="ok").count() == 1
