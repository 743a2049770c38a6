"""The console's look where it guides people: the dashboard's next steps and overview, times
shown relative and absolute, a load's progress, and a storage sync's progress and result."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from accounts.models import Team, User
from config.templatetags.berth_time import absolute, duration_since, relative, with_offsets
from core.queues import get_queue
from deployments.models import Deployment, DeploymentEvent
from deployments.progress import load_progress
from deployments.states import State
from models_registry.jobs import sync_mount_job
from models_registry.models import StorageMount
from models_registry.sync import sync_mount
from tests.deployment_builders import deployment, host_with_gpus, planned, registered_model
from tests.model_dirs import write_model

pytestmark = pytest.mark.django_db


def client_for(person: User) -> Client:
    client = Client()
    client.force_login(person)
    return client


def test_a_new_member_sees_the_first_steps_then_their_deployments(
    alice: User, team_a: Team, tmp_path: Path, django_assert_max_num_queries: Any
) -> None:
    html = client_for(alice).get("/").content.decode()
    assert "Your first deployment" in html
    assert "/models/register/" in html
    assert "Nothing deployed yet." in html

    write_model(tmp_path / "team-a" / "tiny")
    model = registered_model(team_a, tmp_path, "tiny")
    host = host_with_gpus(count=2)
    for index in range(5):
        deployment(team_a, model, host, name=f"d{index}")
    Deployment.objects.filter(name="d0").update(state=State.READY)
    client = client_for(alice)
    with django_assert_max_num_queries(12):
        html = client.get("/").content.decode()
    assert "Your first deployment" not in html
    assert "team-a/d4" in html
    for text in ("1 ready", "4 pending", "gpu-01", "never — start"):
        assert text in html


def test_an_auditor_sees_no_operator_overview(carol: User) -> None:
    html = client_for(carol).get("/").content.decode()
    assert "Recent activity" in html
    assert "Hosts" not in html
    assert "Your first deployment" not in html


def test_times_read_relative_and_absolute(settings: Any) -> None:
    settings.TIME_ZONE = "UTC"
    now = timezone.now().replace(hour=12, minute=0, second=0, microsecond=0)
    assert relative(now - timedelta(seconds=12), now) == "12 s ago"
    assert relative(now - timedelta(minutes=5, seconds=3), now) == "5 min ago"
    assert relative(now - timedelta(hours=3), now) == "3 h ago"
    assert relative(now - timedelta(days=1), now) == "1 day ago"
    assert relative(now + timedelta(minutes=2), now) == "in 2 min"
    assert absolute(now - timedelta(seconds=5), now) == "11:59:55 UTC"
    two_days_ago = now - timedelta(days=2)
    assert absolute(two_days_ago, now) == f"{two_days_ago:%Y-%m-%d} 12:00 UTC"


def test_a_loading_deployment_shows_elapsed_time_and_its_latest_step(
    team_a: Team, tmp_path: Path
) -> None:
    write_model(tmp_path / "team-a" / "tiny")
    row = deployment(team_a, registered_model(team_a, tmp_path, "tiny"), host_with_gpus())
    start = timezone.now() - timedelta(seconds=40)
    events = [
        DeploymentEvent(deployment=row, generation=1, time=start, kind="state", message="queued"),
        DeploymentEvent(
            deployment=row, generation=1, time=start + timedelta(seconds=4.2), kind="progress",
            message="loading weights: 50%",
        ),
    ]  # fmt: skip
    assert [offset for _, offset in with_offsets(events)] == ["+0.0 s", "+4.2 s"]
    assert duration_since(start + timedelta(seconds=125), start) == "2 min 5 s"
    row.state, row.plan = State.LOADING, planned(max_model_len=2048)
    expected = row.stored_plan.startup_estimate_s
    progress = load_progress(row, events, now=start + timedelta(seconds=40))
    assert progress.last_step == "loading weights: 50%"
    assert (progress.expected_s, progress.elapsed_s) == (expected, 40)
    assert progress.percent == 40 * 100 // expected
    row.plan = {}  # a CPU engine has no estimate: no percentage is made up
    assert load_progress(row, events).percent is None
    row.state = State.READY
    assert load_progress(row, events) is None


@pytest.mark.redis
def test_a_running_sync_shows_progress_and_refreshes_then_its_result(
    admin: User, team_a: Team, tmp_path: Path, django_capture_on_commit_callbacks: Any
) -> None:
    mount = StorageMount.objects.create(
        name="ceph", canonical_prefix="/ceph/models", local_path=str(tmp_path),
        host_path="/mnt/ceph", container_path="/models",
    )  # fmt: skip
    write_model(tmp_path / "team-a" / "tiny")
    get_queue("default").empty()
    with django_capture_on_commit_callbacks(execute=True):
        client_for(admin).post(f"/models/mounts/{mount.pk}/sync/")
    assert [job.func for job in get_queue("default").jobs] == [sync_mount_job]
    again = client_for(admin).post(f"/models/mounts/{mount.pk}/sync/", follow=True)
    assert "already queued or running" in again.content.decode()
    assert len(get_queue("default").jobs) == 1
    html = client_for(admin).get("/models/").content.decode()
    assert "Sync queued" in html
    assert 'hx-trigger="every 2s"' in html
    assert "never synced" not in html

    get_queue("default").empty()
    sync_mount(mount)
    html = client_for(admin).get("/models/").content.decode()
    assert "Sync queued" not in html
    assert 'hx-trigger="every 2s"' not in html
    assert "1 new · 0 changed · 0 missing" in html
