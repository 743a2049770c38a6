"""The page-cache prewarm: real files in a temporary directory, read into the page cache (checked
with mincore), bounded by available memory, cancellable, and recorded on the deployment's
timeline and in the audit trail."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from audit.actions import Action
from audit.models import AuditEvent
from deployments.models import DeploymentEvent
from deployments.runtime import prewarm
from models_registry.models import StorageKind, StorageMount
from tests.deployment_builders import deployment, host_with_gpus, registered_model

MIB = 1024**2


def write_shards(directory: Path, sizes: list[int]) -> list[Path]:
    """Weight shards of the given sizes (random bytes, so nothing is sparse), plus a config
    file that is not a weight file; each shard is dropped from the page cache."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    shards = []
    for number, size in enumerate(sizes, start=1):
        path = directory / f"model-{number:05d}-of-{len(sizes):05d}.safetensors"
        path.write_bytes(os.urandom(size))
        prewarm.drop_from_page_cache(path)
        shards.append(path)
    return shards


@pytest.mark.parametrize("zero_copy", [True, False], ids=["sendfile", "preadv"])
def test_prewarm_reads_every_byte_of_every_weight_file_into_the_page_cache(
    tmp_path: Path, zero_copy: bool
) -> None:
    # Sizes that do not divide the chunk or block size, and a file smaller than one block.
    shards = write_shards(tmp_path / "model", [5 * MIB + 7, 3 * MIB, 100_000])
    assert all(prewarm.resident_fraction(path) < 0.5 for path in shards)
    files = prewarm.weight_files(tmp_path / "model")
    assert files == shards  # largest first; config.json is not a weight file

    result = prewarm.Prewarmer(
        files, threads=3, block_bytes=256 * 1024, chunk_bytes=MIB, zero_copy=zero_copy
    ).run()

    assert result.bytes_read == result.total_bytes == sum(p.stat().st_size for p in shards)
    assert (result.files, result.cancelled, result.errors) == (3, False, ())
    # Everything was read (bytes_read above); residency is allowed a little slack because a
    # busy machine may already be evicting the first pages again (seen once under load).
    assert all(prewarm.resident_fraction(path) >= 0.9 for path in shards)


def test_weight_files_follow_snapshot_symlinks_once(tmp_path: Path) -> None:
    """Hugging Face snapshots link to blobs; each blob is read once, however often linked."""
    (blob,) = write_shards(tmp_path / "blobs", [MIB])
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "model.safetensors").symlink_to(blob)
    (snapshot / "copy.safetensors").symlink_to(blob)
    assert prewarm.weight_files(snapshot) == [blob]


def test_progress_is_reported_and_cancel_stops_the_readers(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "model", [16 * MIB, 16 * MIB])
    cancel = threading.Event()
    seen: list[prewarm.Progress] = []

    def on_progress(progress: prewarm.Progress) -> None:
        seen.append(progress)
        cancel.set()  # stop after the first report

    result = prewarm.Prewarmer(
        shards,
        threads=2,
        block_bytes=256 * 1024,
        chunk_bytes=MIB,
        cancel=cancel,
        on_progress=on_progress,
        progress_every_s=0,
    ).run()

    assert result.cancelled
    assert 0 < result.bytes_read < result.total_bytes
    assert seen[0].bytes_read > 0
    assert "prewarming 0.0 GiB" in seen[0].describe()
    assert seen[-1].bytes_read == result.bytes_read  # the final report


def test_the_memory_bound_refuses_weights_larger_than_the_share_of_available_memory(
    tmp_path: Path,
) -> None:
    assert prewarm.fits_in_memory(70 * 1024**3, 100 * 1024**3, 0.8) == ""
    reason = prewarm.fits_in_memory(90 * 1024**3, 100 * 1024**3, 0.8)
    assert "90.0 GiB" in reason
    assert "80%" in reason
    assert "100.0 GiB" in reason
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   1024 kB\n")
    assert prewarm.available_memory_bytes(meminfo) == 1024 * 1024
    assert prewarm.available_memory_bytes() > 0  # this machine's


@pytest.mark.parametrize(
    ("setting", "kind", "expected"),
    [
        ("auto", StorageKind.NETWORK, True),
        ("auto", StorageKind.OBJECT, True),
        ("auto", StorageKind.LOCAL, False),
        ("auto", StorageKind.AUTO, False),
        ("on", StorageKind.LOCAL, True),
        ("off", StorageKind.NETWORK, False),
    ],
)
def test_berth_prewarm_setting_by_storage_kind(setting: str, kind: str, expected: bool) -> None:
    assert prewarm.wanted(kind, setting) is expected


def network_deployment(team: Any, root: Path) -> Any:
    model = registered_model(team, root)
    StorageMount.objects.filter(pk=model.mount_id).update(kind=StorageKind.NETWORK)
    return deployment(team, model, host_with_gpus())


def test_a_deployment_prewarm_is_evented_and_audited(team_a: Any, tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "team-a" / "llama", [3 * MIB, 2 * MIB])
    record = network_deployment(team_a, tmp_path)

    result = prewarm.run(record.pk, record.generation)

    assert result.bytes_read == sum(p.stat().st_size for p in shards)
    messages = list(
        DeploymentEvent.objects.filter(deployment=record).values_list("message", flat=True)
    )
    assert messages[0] == "prewarming 0.0 GiB: 0.0 GiB read, 0.00 GiB/s"
    assert messages[-1].startswith("prewarmed 0.0 GiB in ")
    event = AuditEvent.objects.get(action=Action.DEPLOYMENT_PREWARMED)
    assert (event.outcome, event.target_id) == ("ok", str(record.pk))
    assert event.payload["bytes_read"] == 5 * MIB
    assert event.payload["skipped"] == ""


def test_a_deployment_prewarm_is_skipped_when_memory_is_short(
    team_a: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No host here is short of memory, so the one host fact is replaced."""
    write_shards(tmp_path / "team-a" / "llama", [2 * MIB])
    record = network_deployment(team_a, tmp_path)
    monkeypatch.setattr(prewarm, "available_memory_bytes", lambda: MIB)

    result = prewarm.run(record.pk, record.generation)

    assert result.bytes_read == 0
    assert "exceed 80% of the host's available memory" in result.skipped
    message = DeploymentEvent.objects.get(deployment=record).message
    assert message.startswith("prewarm skipped: the weights (0.0 GiB) exceed")
    event = AuditEvent.objects.get(action=Action.DEPLOYMENT_PREWARMED)
    assert event.payload["skipped"] == result.skipped


def test_a_cancelled_deployment_prewarm_says_so(team_a: Any, tmp_path: Path) -> None:
    write_shards(tmp_path / "team-a" / "llama", [2 * MIB])
    record = network_deployment(team_a, tmp_path)
    stop = threading.Event()
    stop.set()

    result = prewarm.run(record.pk, record.generation, stop)

    assert result.cancelled
    assert result.bytes_read == 0
    last = DeploymentEvent.objects.filter(deployment=record).last()
    assert last.message == "prewarm stopped after 0.0 GiB (no longer needed)"


@pytest.mark.django_db(transaction=True)
def test_the_launch_thread_prewarms_once_per_deployment_and_can_be_cancelled(
    team_a: Any, tmp_path: Path, settings: Any
) -> None:
    settings.BERTH_PREWARM = "auto"
    write_shards(tmp_path / "team-a" / "llama", [4 * MIB])
    record = network_deployment(team_a, tmp_path)
    record.refresh_from_db()

    thread = prewarm.start(record)
    assert thread is not None
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert not prewarm.cancel(record.pk)  # finished: nothing left to cancel
    assert AuditEvent.objects.filter(action=Action.DEPLOYMENT_PREWARMED).count() == 1

    StorageMount.objects.update(kind=StorageKind.LOCAL)
    record.refresh_from_db()
    assert prewarm.start(record) is None  # auto: local disks are not prewarmed


@pytest.mark.django_db(transaction=True)
def test_progress_written_from_reader_threads_closes_their_database_connections(
    team_a: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Progress events are written by whichever reader thread reports; a thread that opened a
    connection for it must close it before it ends (a leaked one per reader per prewarm)."""
    from django.db.backends.signals import connection_created

    write_shards(tmp_path / "team-a" / "llama", [3 * MIB, 2 * MIB])
    record = network_deployment(team_a, tmp_path)
    monkeypatch.setattr(prewarm, "PROGRESS_EVERY_S", 0.0)  # every block reports
    opened: list[Any] = []

    def remember(sender: Any, connection: Any, **kwargs: Any) -> None:
        if threading.current_thread().name.startswith("berth-prewarm-"):
            opened.append(connection)

    connection_created.connect(remember)
    try:
        result = prewarm.run(record.pk, record.generation)
    finally:
        connection_created.disconnect(remember)

    assert result.bytes_read == 5 * MIB
    assert opened, "no reader thread wrote a progress event"
    assert all(wrapper.connection is None for wrapper in opened)


@pytest.mark.django_db(transaction=True)
def test_a_launch_that_raises_unexpectedly_cancels_its_prewarm(
    team_a: Any, tmp_path: Path, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only LaunchFailure and Refused go through fail(), which cancels the prewarm; any other
    exception after the prewarm started (a Docker API error, a database error) must cancel it
    too, or it reads the whole checkpoint for a launch that is not happening."""
    import docker
    from deployments.models import Deployment
    from deployments.runtime import host_checks, launcher
    from deployments.runtime.engine_host import EngineHost
    from deployments.states import State

    settings.BERTH_PREWARM = "on"
    write_shards(tmp_path / "team-a" / "llama", [MIB])
    record = network_deployment(team_a, tmp_path)
    Deployment.objects.filter(pk=record.pk).update(state=State.LAUNCHING)
    record.refresh_from_db()
    started = threading.Event()
    cancelled: list[bool] = []

    def blocking_run(pk: int, generation: int, cancel_event: threading.Event) -> None:
        started.set()
        cancelled.append(cancel_event.wait(timeout=10))

    def docker_error(client: Any, deployment: Any) -> None:
        assert started.wait(timeout=10)
        raise docker.errors.APIError("500 Server Error: the daemon is restarting")

    monkeypatch.setattr(prewarm, "run", blocking_run)
    monkeypatch.setattr(launcher, "_check_model_on_host", lambda deployment: None)
    monkeypatch.setattr(host_checks, "pinned_image", docker_error)

    with pytest.raises(docker.errors.APIError):
        launcher.launch(EngineHost(object()), record, record.generation)

    thread = next(t for t in threading.enumerate() if t.name.endswith(f"-{record.pk}"))
    thread.join(timeout=15)
    assert cancelled == [True]


@pytest.mark.django_db(transaction=True)
def test_a_progress_event_that_cannot_be_written_does_not_stop_the_reading(
    team_a: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Progress events are written from the reader threads; one that fails (SQLite busy, a
    dropped connection) must not kill its reader and leave chunks unread."""
    from django.db import OperationalError

    shards = write_shards(tmp_path / "team-a" / "llama", [3 * MIB, 2 * MIB, MIB])
    record = network_deployment(team_a, tmp_path)
    monkeypatch.setattr(prewarm, "PROGRESS_EVERY_S", 0.0)
    written = prewarm._event

    def flaky(deployment: Any, generation: int, message: str, data: dict) -> None:
        if threading.current_thread().name.startswith("berth-prewarm-"):
            raise OperationalError("database is locked")
        written(deployment, generation, message, data)

    monkeypatch.setattr(prewarm, "_event", flaky)

    result = prewarm.run(record.pk, record.generation)

    assert result.bytes_read == result.total_bytes == sum(p.stat().st_size for p in shards)
    assert not result.cancelled
