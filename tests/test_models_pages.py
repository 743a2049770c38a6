"""Model registry pages: permissions, the register flow with its preview, and the admin sync."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from accounts.models import Team, User
from audit.models import AuditEvent
from models_registry.models import Model, StorageMount
from tests.model_dirs import write_model

pytestmark = pytest.mark.django_db

PEOPLE = ("alice", "bob", "carol", "admin", "anonymous")


@pytest.fixture
def ceph(tmp_path: Path) -> StorageMount:
    """A mount with one folder per team, and a registered model of team A."""
    (tmp_path / "models").mkdir()
    return StorageMount.objects.create(
        name="ceph",
        canonical_prefix="/ceph/models",
        local_path=str(tmp_path / "models"),
        host_path="/mnt/ceph/models",
        container_path="/models",
    )


@pytest.fixture
def llama(ceph: StorageMount, team_a: Team) -> Model:
    write_model(Path(ceph.local_path) / "team-a" / "llama")
    from models_registry.sync import sync_mount

    sync_mount(ceph)
    return Model.objects.get(name="llama")


def client_for(person: User | None) -> Client:
    client = Client()
    if person is not None:
        client.force_login(person)
    return client


def test_permission_matrix(
    people: dict[str, User | None], llama: Model, ceph: StorageMount
) -> None:
    matrix = {
        ("get", "/models/"): (200, 200, 403, 200, 302),
        ("get", "/models/register/"): (200, 200, 403, 200, 302),
        ("get", f"/models/{llama.pk}/"): (200, 404, 403, 200, 302),
        ("post", f"/models/{llama.pk}/inspect/"): (302, 404, 403, 302, 302),
        ("post", f"/models/mounts/{ceph.pk}/sync/"): (403, 403, 403, 302, 302),
        ("get", f"/models/mounts/{ceph.pk}/sync/"): (405, 405, 405, 405, 302),
    }
    for (method, path), expected in matrix.items():
        got = tuple(getattr(client_for(people[name]), method)(path).status_code for name in PEOPLE)
        assert got == expected, (method, path, dict(zip(PEOPLE, got, strict=True)))


def test_list_shows_only_the_teams_models_with_their_facts(
    alice: User, bob: User, llama: Model
) -> None:
    html = client_for(alice).get("/models/").content.decode()
    assert "llama" in html
    assert "Ready" in html
    assert "LlamaForCausalLM" in html
    assert "llama" not in client_for(bob).get("/models/").content.decode().split("<main")[1]


def test_detail_shows_findings_remedies_and_translations(
    alice: User, llama: Model, ceph: StorageMount
) -> None:
    (Path(ceph.local_path) / "team-a" / "llama" / "config.json").write_text("{}")
    client = client_for(alice)
    assert client.post(f"/models/{llama.pk}/inspect/").status_code == 302
    html = client.get(f"/models/{llama.pk}/").content.decode()
    assert "Not deployable" in html
    assert "config-empty" in html
    assert "Fix: Copy the original config.json" in html
    assert "/mnt/ceph/models/team-a/llama" in html
    assert "/models/team-a/llama" in html


def test_register_form_previews_then_registers(
    alice: User, team_a: Team, ceph: StorageMount
) -> None:
    write_model(Path(ceph.local_path) / "team-a" / "qwen")
    client = client_for(alice)
    preview = client.post(
        "/models/register/preview/", {"team": team_a.pk, "path": "/ceph/models/team-a/qwen"}
    )
    assert "Deployable" in preview.content.decode()
    assert "<html" not in preview.content.decode()
    assert not Model.objects.exists()
    response = client.post(
        "/models/register/", {"team": team_a.pk, "path": "/ceph/models/team-a/qwen"}
    )
    model = Model.objects.get()
    assert response["Location"] == f"/models/{model.pk}/"


def test_register_form_errors_name_the_field_and_are_audited(
    alice: User, team_a: Team, ceph: StorageMount
) -> None:
    client = client_for(alice)
    response = client.post(
        "/models/register/", {"team": team_a.pk, "path": "/ceph/models/team-a/../../etc"}
    )
    assert response.status_code == 200
    assert "path may not contain &#x27;..&#x27; segments" in response.content.decode()
    preview = client.post(
        "/models/register/preview/", {"team": team_a.pk, "path": "/ceph/models-evil/x"}
    )
    assert "not inside a registered storage mount" in preview.content.decode()
    assert not Model.objects.exists()
    assert AuditEvent.objects.get(action="model.registered").outcome == "denied"


def test_member_cannot_pick_another_teams_id(alice: User, team_b: Team, ceph: StorageMount) -> None:
    response = client_for(alice).post(
        "/models/register/", {"team": team_b.pk, "path": "/ceph/models/team-b/x"}
    )
    assert "Select a valid choice" in response.content.decode()
    assert not Model.objects.exists()


@pytest.mark.redis
def test_admin_sync_button_queues_a_job(
    admin: User, ceph: StorageMount, django_capture_on_commit_callbacks: Any
) -> None:
    import django_rq

    queue = django_rq.get_queue("default")
    queue.empty()
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(admin).post(f"/models/mounts/{ceph.pk}/sync/")
    assert response.status_code == 302
    event = AuditEvent.objects.get(action="models.sync_requested")
    assert queue.job_ids == [event.payload["job_id_queued"]]
    queue.empty()


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_sync_job_runs_in_a_real_worker_as_the_admin_who_asked(admin: User, tmp_path: Path) -> None:
    from tests.conftest import run_manage, subprocess_env

    team = Team.objects.create(slug="team-a", name="Team A")
    (tmp_path / "store").mkdir()
    mount = StorageMount.objects.create(
        name="store",
        canonical_prefix="/store",
        local_path=str(tmp_path / "store"),
        host_path="/store",
        container_path="/models",
    )
    write_model(tmp_path / "store" / "team-a" / "llama")
    assert client_for(admin).post(f"/models/mounts/{mount.pk}/sync/").status_code == 302
    worker = run_manage("berth_worker", "default", "--burst", env=subprocess_env())
    assert worker.returncode == 0, worker.stderr
    model = Model.objects.get()
    assert (model.team, model.status) == (team, "ok")
    synced = AuditEvent.objects.get(action="models.synced")
    requested = AuditEvent.objects.get(action="models.sync_requested")
    assert (synced.actor_name, synced.actor_kind, synced.request_id) == (
        "root",
        "job",
        requested.request_id,
    )
    assert synced.payload["created"] == 1


@pytest.mark.redis
def test_periodic_sync_is_booked_once_per_mount_and_interval(
    ceph: StorageMount, periodic_claims: Any, django_capture_on_commit_callbacks: Any
) -> None:
    import django_rq

    from models_registry.jobs import sync_due_mounts, sync_mount_job

    queue = django_rq.get_queue("default")
    queue.empty()
    assert sync_due_mounts() == []  # interval 0: manual only
    ceph.sync_interval_minutes = 30
    ceph.save()
    with django_capture_on_commit_callbacks(execute=True):
        first, second = sync_due_mounts(), sync_due_mounts()
    assert (first, second) == ([f"sync-mount-{ceph.pk}"], [])
    assert [(job.func, job.args) for job in queue.jobs] == [(sync_mount_job, (ceph.pk,))]
    queue.empty()


def test_file_sizes_are_binary_and_labelled_so(alice: User, llama: Model) -> None:
    html = client_for(alice).get(f"/models/{llama.pk}/").content.decode()
    sizes = {file["name"]: file["bytes"] for file in llama.files}
    config = sizes["config.json"]
    shown = f"{config:,} B" if config < 1024 else f"{config / 1024:,.1f} KiB"
    assert f'<td data-label="Size">{shown}</td>' in html
    assert not re.search(r"\d (KB|MB|GB)\b", html)  # 1024-based figures never say kB/MB/GB
