"""The demo's gateway key (``config.demo_engine.demo_key``): one key across ``make run``s while it
lasts, kept in a file only its owner can read; a new one (and the old ones revoked) when it is
about to expire, was revoked, or its file could have been read by someone else."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from accounts.keys import authenticate
from accounts.models import ApiKey, KeyScope, Team, User
from config.demo_engine import DEMO_KEY_NAME, demo_key, demo_key_file
from deployments.models import Deployment

pytestmark = pytest.mark.django_db


@pytest.fixture
def chat(settings: Any, tmp_path: Path, team_a: Team, alice: User) -> Deployment:
    """The demo's deployment (unsaved: the key needs only its team, name and requester), with a
    fresh ``var/``."""
    settings.VAR_DIR = tmp_path / "var"
    return Deployment(team=team_a, name="tiny-chat", requested_by=alice)


def usable_demo_keys(team: Team) -> list[ApiKey]:
    return list(ApiKey.objects.usable().filter(team=team, name=DEMO_KEY_NAME))


def test_the_first_run_makes_a_key_kept_in_a_file_only_its_owner_reads(chat: Deployment) -> None:
    key, clear, reused = demo_key(chat)
    assert not reused
    assert key.model_names == ["tiny-chat"]
    assert authenticate(clear, KeyScope.INFERENCE) == key
    path = demo_key_file()
    assert path.read_text().strip() == clear
    assert path.stat().st_mode & 0o777 == 0o600


def test_the_next_run_reuses_the_same_key(chat: Deployment) -> None:
    first, clear, _ = demo_key(chat)
    again, clear_again, reused = demo_key(chat)
    assert reused
    assert (again.pk, clear_again) == (first.pk, clear)
    assert usable_demo_keys(chat.team) == [first]


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda key, path: ApiKey.objects.filter(pk=key.pk).update(
            expires=timezone.now() + timedelta(minutes=30)), id="about-to-expire"),
        pytest.param(lambda key, path: ApiKey.objects.filter(pk=key.pk).update(
            revoked_at=timezone.now()), id="revoked"),
        pytest.param(lambda key, path: os.chmod(path, 0o644), id="readable-by-others"),
        pytest.param(lambda key, path: path.unlink(), id="file-gone"),
    ],
)  # fmt: skip
def test_a_key_that_cannot_be_trusted_is_replaced_and_the_old_ones_revoked(
    chat: Deployment, spoil: Any
) -> None:
    first, clear, _ = demo_key(chat)
    spoil(first, demo_key_file())
    second, clear_second, reused = demo_key(chat)
    assert not reused
    assert second.pk != first.pk
    assert clear_second != clear
    assert usable_demo_keys(chat.team) == [second]  # they do not pile up
    assert demo_key_file().read_text().strip() == clear_second
    assert demo_key_file().stat().st_mode & 0o777 == 0o600
