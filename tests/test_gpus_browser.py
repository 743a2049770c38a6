"""The GPU pages in Chromium: the dashboard of a busy host and a GPU's history, under the
strict CSP (a console error, CSP violations included, fails the test)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from accounts.models import User
from gpus import inventory
from gpus.hosts import register_host
from gpus.parsers import parse_query_csv
from gpus.readings import Collection, SourceFailure
from tests.conftest import browser_login, screenshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

H100 = Path(__file__).parent / "fixtures" / "gpu" / "h100-80gb"


def test_member_sees_the_busy_gpu_flagged_and_its_history(page: Any, alice: User) -> None:
    busy = register_host("gpu-busy")[0]
    reading = parse_query_csv(
        (H100 / "nvidia-smi-query-busy.csv").read_text(),
        apps=(H100 / "nvidia-smi-compute-apps-busy.csv").read_text(),
    )
    now = timezone.now()
    for seconds in (120, 60, 1):
        inventory.store_collection(busy, Collection(reading), now - timedelta(seconds=seconds))
    dark = register_host("gpu-dark")[0]
    inventory.store_collection(
        dark, Collection(None, (SourceFailure("nvml", "NVML Shared Library Not Found"),))
    )
    browser_login(page, "alice")
    page.wait_for_url("**/")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="GPUs").click()
    page.wait_for_url("**/gpus/")
    expect(page.get_by_role("alert")).to_contain_text("NVML Shared Library Not Found")
    row = page.locator("tr.gpu-row").first
    expect(row).to_contain_text("foreign 21.0 GiB")
    expect(row).to_contain_text("pid 435 python3")
    expect(row.get_by_role("note")).to_contain_text("placement avoids this GPU")
    bar = row.get_by_role("img")
    assert bar.bounding_box()["width"] > 200
    screenshot(page, "gpus-index")
    page.get_by_role("link", name="gpu-busy").click()
    page.wait_for_url("**/gpus/hosts/gpu-busy/")
    expect(page.locator("#host-live")).to_contain_text("online")
    page.get_by_role("link", name="GPU 0").click()
    page.wait_for_url("**/gpus/hosts/gpu-busy/0/")
    expect(page.get_by_role("heading", level=1)).to_contain_text("NVIDIA H100 80GB HBM3")
    expect(page.locator("polyline")).to_have_count(5)
    expect(page.locator("tr.proc-foreign")).to_contain_text("python3")
    screenshot(page, "gpu-history")
