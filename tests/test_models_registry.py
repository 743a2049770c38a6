"""Registering models: the model layer only stores canonical paths, teams stay in their folders,
every outcome is audited; sync discovers, refreshes and marks missing without touching files."""

from __future__ import annotations

import json
import os
from io import StringIO
from pathlib import Path
from unittest import mock

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connection, transaction
from django.test import Client

from accounts.models import Team, User
from audit.models import AuditEvent
from models_registry import paths, services
from models_registry.models import Model, ModelStatus, StorageMount
from models_registry.sync import SyncError, sync_mount
from tests.model_dirs import llama_tensors, parameter_count, write_model

pytestmark = pytest.mark.django_db


@pytest.fixture
def ceph(tmp_path: Path) -> StorageMount:
    """The field report's storage: users write /ceph/models, Berth reads tmp_path/fsx/models,
    one folder per team."""
    local = tmp_path / "fsx" / "models"
    local.mkdir(parents=True)
    return StorageMount.objects.create(
        name="ceph",
        canonical_prefix="/ceph/models",
        local_path=str(local),
        host_path="/mnt/ceph/models",
        container_path="/models",
    )


def local(mount: StorageMount, relative: str) -> Path:
    return Path(mount.local_path) / relative


def test_register_inspects_and_stores_the_canonical_path(
    ceph: StorageMount, alice: User, team_a: Team
) -> None:
    write_model(local(ceph, "team-a/tiny-llama"))
    model = services.register(alice, team_a, "/ceph/models/team-a/tiny-llama/")
    assert (model.path, model.name, model.status) == (
        "/ceph/models/team-a/tiny-llama",
        "tiny-llama",
        "ok",
    )
    assert model.parameter_count == parameter_count(llama_tensors())
    assert model.deployable
    where = model.translation()
    assert (where.local, where.host, where.container) == (
        str(local(ceph, "team-a/tiny-llama")),
        "/mnt/ceph/models/team-a/tiny-llama",
        "/models/team-a/tiny-llama",
    )
    event = AuditEvent.objects.get(action="model.registered")
    assert (event.outcome, event.actor_name, event.team_slug) == ("ok", "alice", "team-a")
    assert event.payload["parameter_count"] == model.parameter_count


def test_registering_through_the_page_normalizes_the_path_once(
    ceph: StorageMount, alice: User, team_a: Team
) -> None:
    write_model(local(ceph, "team-a/once"))
    client = Client()
    client.force_login(alice)
    with mock.patch("models_registry.paths.normalize", wraps=paths.normalize) as normalize:
        response = client.post(
            "/models/register/", {"team": team_a.pk, "path": "/ceph/models/team-a/once/"}
        )
    assert response.status_code == 302
    assert Model.objects.get().path == "/ceph/models/team-a/once"
    assert normalize.call_count == 1


def test_a_model_with_errors_is_registered_but_not_deployable(
    ceph: StorageMount, alice: User, team_a: Team
) -> None:
    directory = local(ceph, "team-a/broken")
    write_model(directory)
    (directory / "config.json").write_text("{}")
    model = services.register(alice, team_a, "/ceph/models/team-a/broken")
    assert model.status == ModelStatus.ERRORS
    assert not model.deployable
    assert [finding["code"] for finding in model.error_findings()] == ["config-empty"]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/ceph/models/team-a/../team-b/llama", "'..' segments"),
        ("/ceph/models-evil/team-a/llama", "not inside a registered storage mount"),
        ("/ceph/models/team-b/llama", "not in team team-a's storage"),
        ("/ceph/models/llama", "not in team team-a's storage"),
        ("ceph/models/team-a/llama", "must be absolute"),
    ],
)
def test_refusals_name_the_field_and_are_audited_as_denied(
    ceph: StorageMount, alice: User, team_a: Team, team_b: Team, path: str, message: str
) -> None:
    with pytest.raises(ValidationError) as error:
        services.register(alice, team_a, path)
    assert message in " ".join(error.value.message_dict["path"])
    assert not Model.objects.exists()
    event = AuditEvent.objects.get(action="model.registered")
    assert event.outcome == "denied"
    assert message in event.payload["reason"]


def test_member_of_another_team_cannot_register_for_it(
    ceph: StorageMount, bob: User, team_a: Team
) -> None:
    with pytest.raises(PermissionDenied):
        services.register(bob, team_a, "/ceph/models/team-a/x")
    assert AuditEvent.objects.get(action="model.registered").outcome == "denied"


def test_links_to_another_teams_model_or_out_of_the_mount_are_not_deployable(
    ceph: StorageMount, alice: User, team_a: Team
) -> None:
    write_model(local(ceph, "team-b/secret"))
    local(ceph, "team-a").mkdir()
    os.symlink(local(ceph, "team-b/secret"), local(ceph, "team-a/alias"))
    borrowed = services.register(alice, team_a, "/ceph/models/team-a/alias")
    assert [f["code"] for f in borrowed.findings] == ["path-outside-storage"]  # another team's
    assert not borrowed.deployable
    write_model(local(ceph, "team-a/real"))
    os.symlink(local(ceph, "team-a/real"), local(ceph, "team-a/link"))
    assert services.register(alice, team_a, "/ceph/models/team-a/link").deployable  # own: fine
    outside = local(ceph, "..").resolve() / "outside"
    write_model(outside)
    os.symlink(outside, local(ceph, "team-a/escape"))
    escaped = services.register(alice, team_a, "/ceph/models/team-a/escape")
    assert [f["code"] for f in escaped.findings] == ["path-outside-storage"]  # ...leaving it is not
    assert not escaped.deployable


def test_the_model_layer_refuses_raw_paths(ceph: StorageMount, team_a: Team) -> None:
    with pytest.raises(ValidationError, match=r"'\.\.' segments"):
        Model(team=team_a, mount=ceph, path="/ceph/models/team-a/../x").save()
    with pytest.raises(ValidationError, match=r"not inside a registered storage mount"):
        Model(team=team_a, mount=ceph, path="/elsewhere/x").save()
    model = Model(team=team_a, mount=ceph, path="/ceph/models/team-a/x/")
    model.save()
    assert model.path == "/ceph/models/team-a/x"
    with pytest.raises(ValueError, match=r"only through Model\.save"):
        Model.objects.filter(pk=model.pk).update(path="/ceph/models//x")
    with pytest.raises(ValidationError):
        Model.objects.bulk_create([Model(team=team_a, mount=ceph, path="relative")])


def test_the_database_rejects_non_canonical_paths_written_around_the_orm(
    ceph: StorageMount, team_a: Team
) -> None:
    model = Model(team=team_a, mount=ceph, path="/ceph/models/team-a/x")
    model.save()
    with pytest.raises(IntegrityError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "UPDATE models_registry_model SET path = %s WHERE id = %s",
            ["/ceph/models/a/../b", model.pk],
        )


def test_mount_paths_are_validated_and_may_not_nest(ceph: StorageMount) -> None:
    with pytest.raises(ValidationError) as error:
        StorageMount.objects.create(
            name="inner",
            canonical_prefix="/ceph/models/big",
            local_path="/big",
            host_path="/big",
            container_path="/m",
        )
    assert "overlaps the mount at /ceph/models" in str(error.value)
    with pytest.raises(ValidationError) as error:
        StorageMount.objects.create(
            name="bad",
            canonical_prefix="/x/../y",
            local_path="/y",
            host_path="/y",
            container_path="/m",
        )
    assert "canonical_prefix" in error.value.message_dict


def test_reinspect_picks_up_a_repaired_model(ceph: StorageMount, alice: User, team_a: Team) -> None:
    directory = local(ceph, "team-a/m")
    write_model(directory)
    (directory / "tokenizer.json").unlink()
    model = services.register(alice, team_a, "/ceph/models/team-a/m")
    assert model.status == ModelStatus.ERRORS
    write_model(directory)
    services.reinspect(model)
    model.refresh_from_db()
    assert model.status == ModelStatus.OK
    assert AuditEvent.objects.filter(action="model.inspected").count() == 1


# --- sync -------------------------------------------------------------------------------------


def test_sync_registers_refreshes_and_marks_missing_without_touching_files(
    ceph: StorageMount, team_a: Team, team_b: Team
) -> None:
    write_model(local(ceph, "team-a/llama"))
    write_model(local(ceph, "team-a/org/qwen"))
    write_model(local(ceph, "team-b/mistral"))
    write_model(local(ceph, "no-such-team/orphan"))
    (local(ceph, "team-b/notes")).mkdir()
    files_before = _snapshot(Path(ceph.local_path))

    first = sync_mount(ceph)
    assert (first.created, first.updated, first.missing) == (3, 0, 0)
    assert first.unowned == ["/ceph/models/no-such-team/orphan"]
    assert dict(Model.objects.values_list("path", "team__slug")) == {
        "/ceph/models/team-a/llama": "team-a",
        "/ceph/models/team-a/org/qwen": "team-a",
        "/ceph/models/team-b/mistral": "team-b",
    }
    assert _snapshot(Path(ceph.local_path)) == files_before

    events_before = AuditEvent.objects.count()
    second = sync_mount(ceph)
    assert (second.created, second.updated, second.missing, second.unchanged) == (0, 0, 0, 3)
    assert AuditEvent.objects.count() == events_before + 1  # only the run itself
    assert AuditEvent.objects.order_by("-seq").first().action == "models.synced"

    (local(ceph, "team-a/llama/config.json")).write_text(json.dumps({"model_type": "llama"}))
    os.utime(local(ceph, "team-a/llama/config.json"), ns=(1, 1))
    for path in sorted(local(ceph, "team-b/mistral").iterdir()):
        path.unlink()
    local(ceph, "team-b/mistral").rmdir()
    third = sync_mount(ceph)
    assert (third.created, third.updated, third.missing) == (0, 1, 1)
    statuses = dict(Model.objects.values_list("name", "status"))
    assert statuses == {"llama": "ok", "qwen": "ok", "mistral": "missing"}
    assert Model.objects.count() == 3  # never deleted


def test_sync_of_a_mount_owned_by_one_team(tmp_path: Path, team_a: Team) -> None:
    root = tmp_path / "private"
    write_model(root / "llama")
    mount = StorageMount.objects.create(
        name="private",
        canonical_prefix="/private",
        local_path=str(root),
        host_path="/private",
        container_path="/models",
        team=team_a,
    )
    assert sync_mount(mount).created == 1
    assert Model.objects.get().team == team_a


def test_sync_fails_fast_when_the_mount_root_is_missing(ceph: StorageMount) -> None:
    ceph.local_path = str(Path(ceph.local_path) / "gone")
    ceph.save()
    with pytest.raises(SyncError, match="does not exist or is not a directory"):
        sync_mount(ceph)
    assert not Path(ceph.local_path).exists()  # nothing created
    assert AuditEvent.objects.get(action="models.synced").outcome == "failed"


def test_sync_models_command(ceph: StorageMount, team_a: Team) -> None:
    write_model(local(ceph, "team-a/llama"))
    out = StringIO()
    call_command("sync_models", "ceph", stdout=out)
    assert "ceph: 1 registered, 0 refreshed, 0 unchanged, 0 marked missing" in out.getvalue()
    with pytest.raises(CommandError, match="no storage mount named 'nope' \\(known: ceph\\)"):
        call_command("sync_models", "nope")


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file()
    }
