"""Registering a model in a real browser: the inspection preview appears as the path is typed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from accounts.models import User
from models_registry.models import Model, StorageMount
from tests.conftest import browser_login, screenshot
from tests.model_dirs import write_model

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_member_registers_a_model_after_seeing_its_inspection(
    page: Any, alice: User, tmp_path: Path
) -> None:
    StorageMount.objects.create(
        name="ceph",
        canonical_prefix="/ceph/models",
        local_path=str(tmp_path),
        host_path="/mnt/ceph/models",
        container_path="/models",
    )
    broken = tmp_path / "team-a" / "dummy"
    write_model(broken)
    (broken / "config.json").write_text("{}")
    write_model(tmp_path / "team-a" / "tiny-llama")

    browser_login(page, "alice")
    page.get_by_role("link", name="Models").click()
    expect(page.get_by_text("No models yet.")).to_be_visible()
    page.get_by_role("link", name="Register a model").first.click()

    path = page.get_by_label("Path")
    path.fill("/ceph/models/team-a/dummy")
    preview = page.locator("#preview")
    expect(preview).to_contain_text("Not deployable")
    expect(preview).to_contain_text("config-empty")
    expect(preview).to_contain_text("Fix: Copy the original config.json")
    path.fill("/ceph/models/team-a/../../etc")
    expect(preview).to_contain_text("may not contain '..' segments")
    path.fill("/ceph/models/team-a/tiny-llama")
    expect(preview).to_contain_text("Deployable")
    screenshot(page, "model-register-preview")

    page.get_by_role("button", name="Register and inspect").click()
    expect(page.get_by_role("heading", name="tiny-llama")).to_be_visible()
    expect(page.get_by_text("/mnt/ceph/models/team-a/tiny-llama")).to_be_visible()
    screenshot(page, "model-detail")
    assert Model.objects.get().path == "/ceph/models/team-a/tiny-llama"
