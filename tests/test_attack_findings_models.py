"""Findings 9, 13 and 14 of the attack on a running console (issue 15): hostile numbers in a
member's config.json, a preview that read through links into another team's folder, and
inspection without limits in the web request."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.test import Client

from accounts.models import Team, User
from audit.models import AuditEvent
from deployments import planning as planner
from deployments.models import EngineImage
from deployments.services import DeployRequest, request_deployment
from models_registry import inspection
from models_registry.models import Model, StorageMount
from models_registry.sync import sync_mount
from tests.deployment_builders import host_with_gpus
from tests.model_dirs import LLAMA_CONFIG, write_model

pytestmark = pytest.mark.django_db

HUGE_INTEGER = "9" * 5000
HOSTILE_NUMBERS = {
    "5000-digit-integer": HUGE_INTEGER,
    "nan": "NaN",
    "infinity": "-Infinity",
    "1e308": "1e308",
}


@pytest.fixture
def ceph(tmp_path: Path) -> StorageMount:
    """A mount with one folder per team."""
    (tmp_path / "models").mkdir()
    return StorageMount.objects.create(
        name="ceph",
        canonical_prefix="/ceph/models",
        local_path=str(tmp_path / "models"),
        host_path="/mnt/ceph/models",
        container_path="/models",
    )


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def hostile_config(directory: Path, number: str) -> None:
    """A valid tiny model whose config.json carries ``number`` as its hidden size (written as
    text: Python's json module would never produce it)."""
    write_model(directory)
    text = json.dumps({**LLAMA_CONFIG, "hidden_size": 123456789})
    (directory / "config.json").write_text(text.replace("123456789", number))


# --- 9. numbers in config.json ------------------------------------------------------------------


@pytest.mark.parametrize("number", HOSTILE_NUMBERS.values(), ids=HOSTILE_NUMBERS.keys())
def test_finding_09_preview_and_register_refuse_hostile_numbers_without_a_500(
    alice: User, team_a: Team, ceph: StorageMount, number: str
) -> None:
    hostile_config(Path(ceph.local_path) / "team-a" / "odd", number)
    client = signed_in(alice)
    form = {"team": team_a.pk, "path": "/ceph/models/team-a/odd"}
    preview = client.post("/models/register/preview/", form)
    assert preview.status_code == 200
    assert "config.json" in preview.content.decode()
    assert "hidden_size" in preview.content.decode()
    response = client.post("/models/register/", form)
    assert response.status_code == 302
    model = Model.objects.get()
    assert model.status == "errors"
    assert "config-invalid" in [finding["code"] for finding in model.findings]
    assert model.config == {}  # nothing of the refused file is kept for the planner
    event = AuditEvent.objects.get(action="model.registered")
    assert "config-invalid" in event.payload["finding_codes"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("hidden_size", 10**4000), ("num_hidden_layers", float("nan")), ("vocab_size", 1e308)],
)
def test_finding_09_the_planner_refuses_hostile_numbers_by_name(key: str, value: Any) -> None:
    """A config stored before strict parsing still reaches the planner: it must refuse by name,
    not raise OverflowError or ValueError (a 500)."""
    request = planner.PlanRequest(gpu_memory_bytes=80 * 2**30, gpus_on_host=4)
    with pytest.raises(planner.PlannerError, match=key):
        planner.plan({**LLAMA_CONFIG, key: value}, request, None)


@pytest.mark.parametrize("number", HOSTILE_NUMBERS.values(), ids=HOSTILE_NUMBERS.keys())
def test_finding_09_plan_command_names_the_problem(tmp_path: Path, number: str) -> None:
    hostile_config(tmp_path / "odd", number)
    with pytest.raises(CommandError, match=r"config\.json"):
        call_command(
            "plan",
            "--config",
            str(tmp_path / "odd" / "config.json"),
            "--gpu-memory-gib",
            "80",
            "--gpus",
            "1",
        )


def test_finding_09_deploying_a_model_with_a_hostile_stored_config_is_denied_and_audited(
    alice: User, team_a: Team, ceph: StorageMount
) -> None:
    """A row whose config was stored before this fix (the registry of an older release): the
    deploy request is refused naming the model, and audited as denied."""
    write_model(Path(ceph.local_path) / "team-a" / "old")
    call_command("sync_models", "ceph")
    model = Model.objects.get()
    Model.objects.filter(pk=model.pk).update(config={**LLAMA_CONFIG, "hidden_size": 10**30})
    model.refresh_from_db()
    host = host_with_gpus()
    image = EngineImage.objects.create(name="vllm", reference="vllm/vllm-openai:v0.11.0")
    data = DeployRequest(team=team_a, model=model, host=host, image=image, name="old")
    with pytest.raises(ValidationError, match="hidden_size"):
        request_deployment(alice, data)
    event = AuditEvent.objects.get(action="deployment.launch_requested")
    assert event.outcome == "denied"
    assert "hidden_size" in event.payload["reason"]


def test_finding_09_one_bad_directory_does_not_abort_the_sync_of_the_mount(
    ceph: StorageMount, team_a: Team
) -> None:
    root = Path(ceph.local_path) / "team-a"
    write_model(root / "good")
    hostile_config(root / "huge", HUGE_INTEGER)
    write_model(root / "has space")  # a name no canonical path can hold
    write_model(root / "zz-after")
    result = sync_mount(ceph)
    registered = dict(Model.objects.values_list("name", "status"))
    assert registered == {"good": "ok", "huge": "errors", "zz-after": "ok"}
    assert [failure["path"] for failure in result.failed] == [str(root / "has space")]
    skipped = AuditEvent.objects.get(action="model.sync_failed")
    assert skipped.outcome == "failed"
    assert "has space" in skipped.payload["path"]
    assert "may only use letters" in skipped.payload["error"]
    assert AuditEvent.objects.get(action="models.synced").payload["failed"] == result.failed


# --- 13. links out of the team's folder -------------------------------------------------------


def test_finding_13_preview_reads_nothing_behind_links_leaving_the_team_folder(
    alice: User, team_a: Team, ceph: StorageMount
) -> None:
    root = Path(ceph.local_path)
    secret = root / "team-b" / "secret"
    write_model(secret)
    secret_config = {**LLAMA_CONFIG, "architectures": ["SecretForCausalLM"], "hidden_size": 4096}
    (secret / "config.json").write_text(json.dumps(secret_config))
    leaky = root / "team-a" / "leaky"
    leaky.mkdir(parents=True)
    for name in os.listdir(secret):
        (leaky / name).symlink_to(Path("..", "..", "team-b", "secret", name))
    form = {"team": team_a.pk, "path": "/ceph/models/team-a/leaky"}
    html = signed_in(alice).post("/models/register/preview/", form).content.decode()
    assert "symlink-escapes-storage" in html or "outside the storage" in html
    assert "SecretForCausalLM" not in html
    report = inspection.inspect_directory(leaky, storage_root=root / "team-a")
    assert report.architecture is None
    assert report.parameter_count is None
    assert report.config == {}
    assert report.tokenizer["kind"] is None
    assert all(entry["bytes"] is None for entry in report.files)  # not even team B's sizes
    assert not report.ok


# --- 14. limits of an inspection in the web request --------------------------------------------


def _sparse_shard(path: Path, header_length: int) -> None:
    """A shard that claims a ``header_length``-byte header over a sparse (hole) file."""
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", header_length))
        handle.truncate(8 + header_length + 16)


def _bytes_read() -> int:
    return int(Path("/proc/self/io").read_text().split("rchar: ")[1].split()[0])


def test_finding_14_total_header_bytes_are_capped(tmp_path: Path) -> None:
    model = tmp_path / "sparse"
    write_model(model)
    (model / "model.safetensors").unlink()
    for number in range(10):
        _sparse_shard(model / f"model-{number:05d}-of-00010.safetensors", 100 * 2**20)
    before = _bytes_read()
    report = inspection.inspect_directory(model)
    read = _bytes_read() - before
    assert read <= inspection.MAX_TOTAL_HEADER_BYTES + 2**20, f"read {read:,} bytes"
    codes = [finding.code for finding in report.findings]
    assert "safetensors-headers-too-large" in codes
    assert not report.ok


def test_finding_14_shard_count_is_capped(tmp_path: Path) -> None:
    model = tmp_path / "many"
    write_model(model)
    for number in range(inspection.MAX_SHARDS + 1):
        (model / f"extra-{number:05d}.safetensors").write_bytes(b"")
    report = inspection.inspect_directory(model)
    too_many = [f for f in report.findings if f.code == "safetensors-too-many-shards"]
    assert too_many
    assert str(inspection.MAX_SHARDS) in too_many[0].message
    assert not any(f.code == "safetensors-header-invalid" for f in report.findings)


def test_finding_14_an_oversized_header_length_is_named_as_such(tmp_path: Path) -> None:
    model = tmp_path / "big-header"
    write_model(model)
    _sparse_shard(model / "model.safetensors", inspection.MAX_HEADER_BYTES + 1)
    report = inspection.inspect_directory(model)
    [finding] = [f for f in report.findings if f.code == "safetensors-header-invalid"]
    assert "limit" in finding.message
    assert "does not fit" not in finding.message


def test_finding_14_denied_rows_say_what_was_attempted(
    alice: User, team_a: Team, team_b: Team, ceph: StorageMount
) -> None:
    client = signed_in(alice)
    body = {
        "team": "team-a",
        "model": 1,
        "host": "gpu-01",
        "image": "vllm",
        "name": "sneaky",
        "privileged": True,
    }
    response = client.post("/deployments/api/", body, content_type="application/json")
    assert response.status_code == 400
    event = AuditEvent.objects.get(action="deployment.launch_requested")
    assert event.outcome == "denied"
    attempted = event.payload["attempted"]
    assert (attempted["name"], attempted["team"], attempted["host"]) == (
        "sneaky",
        "team-a",
        "gpu-01",
    )
    assert event.payload["name"] == "sneaky"
    # Refused by the form (a team alice is not in) and by the service, which normalizes the
    # path once (a path with "..", a path in another team's folder).
    client.post("/models/register/", {"team": team_a.pk, "path": "/ceph/models/team-a/../x"})
    client.post("/models/register/", {"team": team_b.pk, "path": "/ceph/models/team-b/y"})
    client.post("/models/register/", {"team": team_a.pk, "path": "/ceph/models/team-b/y"})
    events = AuditEvent.objects.filter(action="model.registered").order_by("seq")
    assert [event.outcome for event in events] == ["denied"] * 3
    assert [event.payload["attempted"] for event in events] == [
        {"team": "team-a", "path": "/ceph/models/team-a/../x"},
        {"team": str(team_b.pk), "path": "/ceph/models/team-b/y"},
        {"team": "team-a", "path": "/ceph/models/team-b/y"},
    ]
    assert [event.team_slug for event in events] == ["team-a", "", "team-a"]
