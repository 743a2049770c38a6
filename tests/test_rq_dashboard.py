"""The RQ dashboard (admins) lists every host's queue, not only ``default``, and its pages run
under the console's Content Security Policy without a violation."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect
from redis import Redis
from rq import Queue

from accounts.models import User
from audit.jobs import verify_chain
from config.rq_dashboard import inline_hashes, policy
from config.rq_queues import QueueSettings
from core.queues import get_queue
from gpus.hosts import register_host
from tests.conftest import TEST_REDIS_URL, browser_login


@pytest.mark.browser
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_the_rq_dashboard_lists_host_queues_under_the_csp(page: Any, admin: User) -> None:
    host = register_host("gpu-07")[0]
    queue = get_queue(host.queue_name)
    queue.empty()
    queue.enqueue(verify_chain, job_id="waiting-on-gpu-07")
    try:
        browser_login(page, "root")
        page.wait_for_url("**/")
        page.goto("/admin/django_rq/dashboard/")
        table = page.locator("#results_list")
        expect(table.get_by_role("link", name="default", exact=True)).to_be_visible()
        expect(table.get_by_role("link", name="host:gpu-07", exact=True)).to_be_visible()
        table.get_by_role("link", name="host:gpu-07", exact=True).click()
        page.get_by_role("link", name="waiting-on-gpu-07").first.click()
        expect(page.get_by_text("audit.jobs.verify_chain")).to_be_visible()
        page.goto("/admin/django_rq/dashboard/workers/0/")
    finally:
        queue.empty()
    # The page fixture fails the test on any console error, a CSP violation included.


def test_without_redis_the_dashboard_lists_the_configured_queues() -> None:
    queues = QueueSettings(default={"URL": "redis://127.0.0.1:1/0", "DEFAULT_TIMEOUT": 60})
    assert [name for name, _ in queues.items()] == ["default"]
    assert queues["host:gpu-09"] is queues["default"]  # any host queue, on the same server
    with pytest.raises(KeyError):
        queues["other"]


@pytest.mark.redis
def test_a_queue_that_is_not_berths_is_left_off_the_dashboard() -> None:
    """A queue another tool (or test) made in the same Redis would be looked up by name on
    the dashboard, and an unknown name is a KeyError: the page answered 500."""
    stray = Queue("not-berths", connection=Redis.from_url(TEST_REDIS_URL))
    stray.enqueue(verify_chain, job_id="stray-job")
    try:
        queues = QueueSettings(default={"URL": TEST_REDIS_URL, "DEFAULT_TIMEOUT": 60})
        names = [name for name, _ in queues.items()]
        assert "not-berths" not in names
        assert all(queues[name] is queues["default"] for name in names)
    finally:
        stray.delete(delete_jobs=True)


def test_only_django_rqs_own_fixed_snippets_are_allowed_on_its_pages() -> None:
    hashes = inline_hashes()
    assert len(hashes["script"]) == 1  # the admin actions call every list page makes
    policy_ = policy()
    assert "'unsafe-inline'" not in policy_["script-src"] + policy_["style-src"]
    assert set(hashes["script"]) <= set(policy_["script-src"])
