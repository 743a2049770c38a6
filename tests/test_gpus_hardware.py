"""The GPU inventory against a real NVIDIA GPU: NVML, nvidia-smi CSV and nvidia-smi XML must
agree on the same board, a process holding GPU memory must show up in every source that lists
processes and count as foreign memory, and placement must refuse that GPU for a request that
no longer fits.

Marked ``gpu``: these tests skip where NVML finds no GPU — always in CI, which has none, so
``BERTH_REQUIRE_SERVICES`` does not turn them into failures. They run on a GPU host with
``pytest tests/test_gpus_hardware.py -m gpu -n 0``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from django.utils import timezone

from gpus import rounds
from gpus.collectors import CollectorError, collect, read_nvml
from gpus.inventory import fleet, policy
from gpus.models import Host
from gpus.readings import Inventory, Source
from gpus.selection import Need, Reason, select_on_fleet

pytestmark = pytest.mark.gpu

HOLD_MIB = 8192  # what the foreign process allocates: far above the foreign threshold
# nvidia-smi rounds to MiB and NVML's v2 "used" excludes the driver reserve, so the sources
# differ by the reserve (hundreds of MiB on an H100) plus rounding; the rest must match exactly.
USED_TOLERANCE_MIB = 1024


@pytest.fixture(scope="module")
def nvml_inventory() -> Inventory:
    """The GPUs NVML sees on this machine (skips where there are none)."""
    try:
        inventory = read_nvml()
    except CollectorError as exc:
        pytest.skip(f"no NVIDIA GPU here: {exc}")
    if not inventory.gpus:
        pytest.skip("NVML answered but lists no GPUs")
    return inventory


def _only(source: str) -> Inventory:
    collection = collect(sources=(source,))
    assert collection.inventory is not None, collection.failures
    return collection.inventory


def test_nvml_and_both_nvidia_smi_forms_describe_the_same_boards(nvml_inventory: Inventory) -> None:
    csv, xml = _only(Source.SMI_CSV), _only(Source.SMI_XML)
    for other in (csv, xml):
        assert [g.uuid for g in other.gpus] == [g.uuid for g in nvml_inventory.gpus]
        assert [g.index for g in other.gpus] == [g.index for g in nvml_inventory.gpus]
        for ours, theirs in zip(nvml_inventory.gpus, other.gpus, strict=True):
            assert theirs.name == ours.name
            assert theirs.memory_total_mib == ours.memory_total_mib
            assert abs(theirs.memory_used_mib - ours.memory_used_mib) <= USED_TOLERANCE_MIB
            assert theirs.compute_capability in (None, ours.compute_capability)
    sys.stdout.write("\n" + "\n".join(_describe(g) for g in nvml_inventory.gpus) + "\n")


def _describe(gpu: Any) -> str:
    return (
        f"GPU {gpu.index} {gpu.name} {gpu.uuid}: {gpu.memory_used_mib}/{gpu.memory_total_mib} MiB "
        f"used, reserved {gpu.memory_reserved_mib} MiB, cc {gpu.compute_capability}, "
        f"MIG {gpu.mig_enabled}, {gpu.power_w} W of {gpu.power_limit_w} W, "
        f"{gpu.temperature_c} C, processes {len(gpu.processes or ())}"
    )


@pytest.fixture
def foreign_process(nvml_inventory: Inventory) -> Iterator[subprocess.Popen[str]]:
    """A process outside Berth holding HOLD_MIB of GPU 0's memory until the test ends."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed: nothing here can allocate GPU memory")
    script = (
        "import sys, torch\n"
        f"block = torch.empty({HOLD_MIB} * 2**20, dtype=torch.uint8, device='cuda:0')\n"
        "torch.cuda.synchronize()\n"
        "print('holding', flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "holding"
            yield process
        finally:
            process.kill()


def _holder(inventory: Inventory, pid: int) -> Any:
    processes = inventory.gpus[0].processes
    assert processes is not None, f"{inventory.source} listed no processes"
    return next((p for p in processes if p.pid == pid), None)


def test_a_process_holding_memory_is_seen_by_every_source_that_lists_processes(
    foreign_process: subprocess.Popen[str],
) -> None:
    for source in (Source.NVML, Source.SMI_XML):
        inventory = _only(source)
        holder = _holder(inventory, foreign_process.pid)
        # In a container without the host's pid namespace NVML reports no pids it can map;
        # then the memory must still show up as used.
        if holder is not None:
            assert holder.used_memory_mib >= HOLD_MIB, (source, holder)
        assert inventory.gpus[0].memory_used_mib >= HOLD_MIB, source


@pytest.mark.django_db
# A GPU host without a Docker engine: docker-py's UnixHTTPConnection leaves its socket open when
# /var/run/docker.sock is missing (seen on an H100 host with no engine); the agent reports Docker
# as unreachable, and the leak is the SDK's, not Berth's.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_placement_refuses_the_gpu_a_foreign_process_fills(
    foreign_process: subprocess.Popen[str], nvml_inventory: Inventory, settings: Any
) -> None:
    host = Host.objects.create(name="gpu-host")
    # No Docker client: every process is unattributed, so its memory counts as foreign.
    collection = rounds.collect_round(host, sources=(Source.NVML,), client=None)
    assert collection.inventory is not None
    gpu = host.gpus.get(index=0)
    assert gpu.memory_foreign_mib >= HOLD_MIB
    assert gpu.foreign_processes, "the holder should be listed as a foreign process"

    total = gpu.memory_total_mib
    now = timezone.now()
    # With the default threshold, 8 GiB of someone else's memory flags the GPU as busy.
    small = select_on_fleet(fleet(), Need(count=1, memory_mib=1024), policy(), now=now)
    assert small.choice is None
    assert _reasons(small) == {Reason.FOREIGN_PROCESS}

    settings.BERTH_GPU_FOREIGN_THRESHOLD_MIB = total  # now judge on free memory alone
    fits = Need(count=1, memory_mib=total - HOLD_MIB - 4096)
    chosen = select_on_fleet(fleet(), fits, policy(), now=now).choice
    assert chosen is not None
    assert [g.index for g in chosen.chosen] == [0]
    too_big = select_on_fleet(
        fleet(), Need(count=1, memory_mib=total - HOLD_MIB // 2), policy(), now=now
    )
    assert too_big.choice is None
    assert _reasons(too_big) == {Reason.NOT_ENOUGH_FREE_MEMORY}
    sys.stdout.write(
        f"\nforeign {gpu.memory_foreign_mib} MiB on {gpu.name}: "
        f"{too_big.per_host['gpu-host'].summary}\n"
    )


def _reasons(selection: Any) -> set[str]:
    return {r.reason for r in selection.per_host["gpu-host"].rejected if r.gpu.index == 0}
