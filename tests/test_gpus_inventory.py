"""Storing collections: current rows, batched history, host state and its audit trail,
retention roll-ups, attribution of GPU memory to Berth's containers, and the commands."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from audit.models import AuditEvent
from core.naming import DEPLOYMENT_LABEL
from gpus import inventory
from gpus.attribution import attribute, memory_split
from gpus.hosts import register_host
from gpus.models import GpuSnapshot, Host, HostStatus, Resolution
from gpus.parsers import parse_any, parse_query_csv
from gpus.readings import Collection, GpuReading, Inventory, ProcessReading, SourceFailure
from gpus.selection import Need, Reason, select_on_fleet

pytestmark = pytest.mark.django_db

H100 = Path(__file__).parent / "fixtures" / "gpu" / "h100-80gb"
PUBLIC = Path(__file__).parent / "fixtures" / "gpu" / "public"
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def busy_h100() -> Inventory:
    return parse_query_csv(
        (H100 / "nvidia-smi-query-busy.csv").read_text(),
        apps=(H100 / "nvidia-smi-compute-apps-busy.csv").read_text(),
    )


def eight_v100() -> Inventory:
    return parse_any((PUBLIC / "v100s-pcie-32gb-x8-q.xml").read_text())


@pytest.fixture
def host(db: None) -> Host:
    """A registered host whose agent has not reported yet."""
    return register_host("gpu-01")[0]


def test_register_host_is_audited_and_names_its_queue(host: Host) -> None:
    assert host.queue_name == "host:gpu-01"
    assert host.state() == "waiting"
    event = AuditEvent.objects.get(action="host.registered")
    assert event.target_repr == "gpu-01"
    _host, created = register_host("gpu-01", docker_endpoint="tcp://gpu-01:2376")
    assert not created
    assert AuditEvent.objects.filter(action="host.updated").count() == 1


def test_register_host_command(capsys: Any) -> None:
    call_command("register_host", "gpu-02", "--label", "rack=a", "--label", "nvlink=yes")
    assert "berth_agent --host gpu-02" in capsys.readouterr().out
    assert Host.objects.get(name="gpu-02").labels == {"rack": "a", "nvlink": "yes"}
    with pytest.raises(CommandError, match="lowercase"):
        call_command("register_host", "Not A Name")


def test_collection_stores_current_rows_and_one_batch_of_history(
    host: Host, django_assert_max_num_queries: Any
) -> None:
    collection = Collection(eight_v100())
    inventory.store_collection(host, collection, NOW)  # first round: rows created, audited
    with django_assert_max_num_queries(12):  # the second round: no per-GPU queries
        inventory.store_collection(host, collection, NOW + timedelta(seconds=15))
    host.refresh_from_db()
    assert (host.status, host.inventory_source, host.state(NOW)) == (
        HostStatus.ONLINE,
        "nvidia-smi-xml",
        "online",
    )
    assert list(host.gpus.values_list("index", flat=True)) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert GpuSnapshot.objects.filter(gpu__host=host).count() == 16
    gpu0 = host.gpus.get(index=0)
    assert (gpu0.memory_used_mib, gpu0.memory_foreign_mib, gpu0.memory_berth_mib) == (
        31689,
        31689,
        0,
    )
    assert gpu0.processes[0]["pid"] == 37305
    assert AuditEvent.objects.filter(action="gpu.appeared").count() == 8


@pytest.mark.postgres
def test_only_rounds_without_a_state_change_skip_the_wal_flush(host: Host) -> None:
    def commit_mode() -> str:
        with connection.cursor() as cursor:  # SET LOCAL lasts until the test's transaction ends
            cursor.execute("SHOW synchronous_commit")
            return cursor.fetchone()[0]

    inventory.store_collection(host, Collection(busy_h100()), NOW)  # pending -> online: audited
    assert commit_mode() == "on"
    inventory.store_collection(host, Collection(busy_h100()), NOW + timedelta(seconds=15))
    assert commit_mode() == "off"


def test_all_sources_failing_marks_the_host_unavailable_with_each_error(host: Host) -> None:
    inventory.store_collection(host, Collection(busy_h100()), NOW)
    failures = (
        SourceFailure("nvml", "NVML: NVMLError_LibraryNotFound"),
        SourceFailure("docker-nvidia-smi", "Docker cannot give containers GPUs"),
    )
    inventory.store_collection(host, Collection(None, failures), NOW + timedelta(seconds=15))
    host.refresh_from_db()
    assert host.status == HostStatus.INVENTORY_UNAVAILABLE
    assert host.inventory_errors == [
        {"source": "nvml", "error": "NVML: NVMLError_LibraryNotFound"},
        {"source": "docker-nvidia-smi", "error": "Docker cannot give containers GPUs"},
    ]
    assert not host.gpus.filter(present=True).exists()  # nothing left to place on
    event = AuditEvent.objects.get(action="host.inventory_unavailable")
    assert event.outcome == "failed"
    inventory.store_collection(host, Collection(busy_h100()), NOW + timedelta(seconds=30))
    assert AuditEvent.objects.filter(action="host.inventory_restored").count() == 1


def test_a_gpu_that_disappears_is_kept_but_not_present(host: Host) -> None:
    full = eight_v100()
    inventory.store_collection(host, Collection(full), NOW)
    seven = Inventory(full.source, full.gpus[:7])
    inventory.store_collection(host, Collection(seven), NOW + timedelta(seconds=15))
    assert list(host.gpus.filter(present=False).values_list("index", flat=True)) == [7]
    assert AuditEvent.objects.filter(action="gpu.disappeared").count() == 1


def test_busy_gpu_from_the_database_is_not_placed(host: Host, settings: Any) -> None:
    inventory.store_collection(host, Collection(busy_h100()), NOW)
    with mock.patch("django.utils.timezone.now", return_value=NOW + timedelta(seconds=5)):
        fleet = inventory.fleet()
    result = select_on_fleet(
        fleet, Need(1, 1000), inventory.policy(), now=NOW + timedelta(seconds=5)
    )
    assert result.choice is None
    assert result.per_host["gpu-01"].reasons() == {0: Reason.FOREIGN_PROCESS}
    assert "pid 435 python3" in result.per_host["gpu-01"].rejected[0].detail


def test_offline_host_gets_no_placement(host: Host) -> None:
    inventory.store_collection(host, Collection(eight_v100()), NOW)
    later = NOW + timedelta(minutes=5)  # 3 intervals of 15 s is the default limit
    with mock.patch("django.utils.timezone.now", return_value=later):
        (entry,) = inventory.fleet()
        assert Host.objects.get().state() == "offline"
    assert entry.online is False
    result = select_on_fleet([entry], Need(1, 1), inventory.policy(), now=later)
    assert set(result.per_host["gpu-01"].reasons().values()) == {Reason.HOST_OFFLINE}


def test_memory_split_counts_unattributed_memory_as_foreign() -> None:
    reading = GpuReading(
        0,
        "GPU-a",
        "H100",
        81559,
        30_000,
        processes=(
            ProcessReading(1, 20_000, "vllm", deployment="dep-7"),
            ProcessReading(2, 4_000, "python3"),
        ),
    )
    assert memory_split(reading) == (20_000, 10_000)
    assert memory_split(GpuReading(0, "GPU-a", "H100", 81559, None)) == (0, None)


def test_history_is_rolled_up_and_expired(host: Host, settings: Any) -> None:
    settings.BERTH_GPU_RAW_RETENTION_H = 1
    settings.BERTH_GPU_ROLLUP_MINUTES = 5
    settings.BERTH_GPU_ROLLUP_RETENTION_D = 1
    inventory.store_collection(host, Collection(busy_h100()), NOW)
    gpu = host.gpus.get()
    GpuSnapshot.objects.all().delete()
    start = NOW - timedelta(hours=3)
    GpuSnapshot.objects.bulk_create(
        GpuSnapshot(
            gpu=gpu,
            time=start + timedelta(seconds=15 * step),
            source="nvml",
            memory_used_mib=21453 + step % 2,
            utilization_gpu_pct=100,
        )
        for step in range(3 * 60 * 4)  # every 15 s for three hours
    )
    GpuSnapshot.objects.create(gpu=gpu, time=NOW - timedelta(days=2), source="nvml")
    result = inventory.compact_history(host, NOW)
    snapshots = GpuSnapshot.objects.filter(gpu__host=host)
    raw = snapshots.filter(resolution=Resolution.RAW)
    rollups = snapshots.filter(resolution=Resolution.ROLLUP)
    assert result["expired"] == 1
    assert raw.order_by("time").first().time >= NOW - timedelta(hours=1, minutes=5)
    assert rollups.count() == result["rollups"] == 24  # 2 h of 5-minute buckets
    assert {row.samples for row in rollups} == {20}
    assert {row.memory_used_mib for row in rollups} == {21454}  # the maximum of the bucket
    assert inventory.compact_history(host, NOW) == {"rolled_up": 0, "rollups": 0, "expired": 0}


@pytest.mark.usefixtures("no_nvidia_driver")
def test_agent_once_on_this_machine_reports_unavailable(host: Host, capsys: Any) -> None:
    with pytest.raises(CommandError, match="inventory unavailable on gpu-01"):
        call_command(
            "berth_agent", "--host", "gpu-01", "--once", "--sources", "nvml,nvidia-smi-xml"
        )
    out = capsys.readouterr().out
    assert "nvml: NVML: NVMLError_LibraryNotFound" in out
    host.refresh_from_db()
    assert host.status == HostStatus.INVENTORY_UNAVAILABLE
    assert [e["source"] for e in host.inventory_errors] == ["nvml", "nvidia-smi-xml"]


def test_agent_refuses_an_unregistered_host() -> None:
    with pytest.raises(CommandError, match="register_host nowhere"):
        call_command("berth_agent", "--host", "nowhere", "--once")


@pytest.mark.docker
def test_gpu_memory_of_a_labelled_container_is_berths(
    docker_client: Any, busybox_image: str
) -> None:
    ours = docker_client.containers.run(
        busybox_image, ["sleep", "60"], detach=True, labels={DEPLOYMENT_LABEL: "dep-42"}
    )
    theirs = docker_client.containers.run(busybox_image, ["sleep", "60"], detach=True)
    try:
        ours.reload()
        theirs.reload()
        reading = GpuReading(
            0,
            "GPU-a",
            "H100",
            81559,
            30_000,
            processes=(
                ProcessReading(ours.attrs["State"]["Pid"], 20_000, "vllm"),
                ProcessReading(theirs.attrs["State"]["Pid"], 6_000, "python3"),
                ProcessReading(999_999, 1_000, "ghost"),
            ),
        )
        (gpu,) = attribute(Inventory("nvml", (reading,)), docker_client).gpus
    finally:
        ours.remove(force=True)
        theirs.remove(force=True)
    vllm, python, ghost = gpu.processes
    assert (vllm.deployment, vllm.container_id) == ("dep-42", ours.id[:12])
    assert (python.deployment, python.container_name) == ("", theirs.name)
    assert ghost.container_id == ""
    assert memory_split(gpu) == (20_000, 10_000)


def test_berth_up_registers_this_machine_on_the_first_run_only(settings: Any) -> None:
    from config.management.commands.berth_up import Command

    settings.BERTH_LOCAL_HOST_NAME = "workstation"
    command = Command()
    assert command._local_gpu_host() == "workstation"
    assert list(Host.objects.values_list("name", flat=True)) == ["workstation"]
    assert AuditEvent.objects.filter(action="host.registered").count() == 1
    Host.objects.all().delete()
    register_host("gpu-01")
    assert command._local_gpu_host() is None  # not the first run: nothing re-registered
    settings.BERTH_LOCAL_AGENT = False
    settings.BERTH_LOCAL_HOST_NAME = "gpu-01"
    assert command._local_gpu_host() is None
