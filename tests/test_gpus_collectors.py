"""Collectors: NVML (the library is patched at its one adapter, with autospec, from the H100
capture), nvidia-smi and nvidia-smi in a container on this machine's real Docker engine, and
the rule that a host whose sources all fail gets no guessed GPUs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pynvml
import pytest

from gpus import collectors
from gpus.collectors import CollectorError, Nvml, collect, read_docker_smi
from gpus.readings import GpuReading, Inventory, Source

H100 = Path(__file__).parent / "fixtures" / "gpu" / "h100-80gb"
PUBLIC = Path(__file__).parent / "fixtures" / "gpu" / "public"


def fake_pynvml(v2: bool = True) -> Any:
    """pynvml with every call autospecced (so our calls match its real signatures) and the
    answers of the H100 in ``nvml-busy.json``."""
    device = json.loads((H100 / "nvml-busy.json").read_text())["devices"][0]
    library = mock.create_autospec(pynvml)
    library.NVMLError = pynvml.NVMLError
    library.nvmlMemory_v2 = pynvml.nvmlMemory_v2
    library.NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    library.nvmlSystemGetDriverVersion.return_value = "580.159.04"
    library.nvmlDeviceGetCount.return_value = 1
    library.nvmlDeviceGetHandleByIndex.return_value = "handle-0"
    library.nvmlDeviceGetIndex.return_value = device["index"]
    library.nvmlDeviceGetName.return_value = device["name"]
    library.nvmlDeviceGetUUID.return_value = device["uuid"].encode()  # older bindings: bytes
    library.nvmlDeviceGetPciInfo.return_value = SimpleNamespace(busId=b"00000000:00:06.0")

    def memory(handle: Any, version: Any = None) -> SimpleNamespace:
        if version is None:
            return SimpleNamespace(**device["memory_info"])
        if not v2:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return SimpleNamespace(**device["memory_info_v2"])

    library.nvmlDeviceGetMemoryInfo.side_effect = memory
    library.nvmlDeviceGetUtilizationRates.return_value = SimpleNamespace(gpu=100, memory=42)
    library.nvmlDeviceGetTemperature.return_value = 70
    library.nvmlDeviceGetPowerUsage.return_value = 688734
    library.nvmlDeviceGetEnforcedPowerLimit.return_value = 700000
    library.nvmlDeviceGetMigMode.side_effect = pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
    library.nvmlDeviceGetCudaComputeCapability.return_value = (9, 0)
    library.nvmlDeviceGetPersistenceMode.return_value = 1
    library.nvmlDeviceGetComputeRunningProcesses.return_value = [
        SimpleNamespace(pid=435, usedGpuMemory=22485663744)
    ]
    return library


def test_nvml_reads_the_h100_with_the_v2_memory_call_and_inits_once() -> None:
    library = fake_pynvml()
    nvml = Nvml(library)
    with mock.patch.object(collectors, "NVML", nvml):
        first = collectors.read_nvml()
        collectors.read_nvml()
    assert library.nvmlInit.call_count == 1
    library.nvmlDeviceGetMemoryInfo.assert_called_with("handle-0", version=pynvml.nvmlMemory_v2)
    (gpu,) = first.gpus
    assert first.source == Source.NVML
    assert (gpu.index, gpu.uuid) == (0, "GPU-c52ba79b-f39d-a388-315d-65a6606606ea")
    assert (gpu.memory_used_mib, gpu.memory_total_mib, gpu.memory_reserved_mib) == (
        21453,
        81559,
        480,
    )
    assert gpu.mig_enabled is None  # not supported on this call: unknown, not "off"
    assert [(p.pid, p.used_memory_mib) for p in gpu.processes] == [(435, 21444)]


def test_nvml_falls_back_to_v1_memory_on_old_drivers() -> None:
    with mock.patch.object(collectors, "NVML", Nvml(fake_pynvml(v2=False))):
        (gpu,) = collectors.read_nvml().gpus
    assert gpu.memory_used_mib == 21933


@pytest.mark.usefixtures("no_nvidia_driver")
def test_nvml_without_the_library_fails_cleanly() -> None:
    # Without NVIDIA's driver the real pynvml raises NVMLError_LibraryNotFound.
    with (
        mock.patch.object(collectors, "NVML", Nvml()),
        pytest.raises(CollectorError, match="NVMLError_LibraryNotFound"),
    ):
        collectors.read_nvml()


@pytest.mark.usefixtures("no_nvidia_driver")
def test_every_source_failing_gives_no_inventory_and_every_error() -> None:
    with mock.patch.object(collectors.shutil, "which", autospec=True, return_value=None):
        result = collect(sources=(Source.NVML, Source.SMI_CSV, Source.SMI_XML))
    assert result.inventory is None
    assert [failure.source for failure in result.failures] == [
        Source.NVML,
        Source.SMI_CSV,
        Source.SMI_XML,
    ]
    assert "nvidia-smi is not installed" in result.failures[1].error


def test_a_source_listing_a_gpu_without_index_is_refused() -> None:
    partial = collectors.parse_smi_xml((PUBLIC / "gtx-1070-2-of-6-attached-q.xml").read_text())
    with mock.patch.object(collectors, "read_smi_xml", autospec=True, return_value=partial):
        result = collect(sources=(Source.SMI_XML,))
    assert result.inventory is None
    assert "without an index" in result.failures[0].error


def test_a_source_repeating_an_index_is_refused() -> None:
    twice = Inventory(
        Source.NVML, (GpuReading(0, "GPU-a", "H100", 1, 0), GpuReading(0, "GPU-b", "H100", 1, 0))
    )
    with mock.patch.object(collectors, "read_nvml", autospec=True, return_value=twice):
        result = collect(sources=(Source.NVML,))
    assert result.inventory is None
    assert "same GPU index twice" in result.failures[0].error


def test_first_complete_source_wins_and_earlier_failures_are_kept() -> None:
    good = Inventory(Source.SMI_CSV, (GpuReading(0, "GPU-x", "H100", 80_000, 0),))
    with (
        mock.patch.object(collectors, "read_nvml", side_effect=CollectorError("no NVML")),
        mock.patch.object(collectors, "read_smi_csv", autospec=True, return_value=good),
        mock.patch.object(collectors, "read_smi_xml", autospec=True) as xml,
    ):
        result = collect()
    assert result.inventory.source == Source.SMI_CSV
    assert result.inventory.collected_at is not None
    assert [f.error for f in result.failures] == ["no NVML"]
    xml.assert_not_called()


def test_nvidia_smi_binary_output_is_parsed(tmp_path: Path) -> None:
    """A stand-in nvidia-smi (a shell script printing the H100 capture) on PATH."""
    script = tmp_path / "nvidia-smi"
    busy = (H100 / "nvidia-smi-query-busy.csv").read_text()
    apps = (H100 / "nvidia-smi-compute-apps-busy.csv").read_text()
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in --query-gpu=*) cat <<"EOF"\n'
        + busy
        + 'EOF\n;; *) cat <<"EOF"\n'
        + apps
        + "EOF\n;; esac\n"
    )
    script.chmod(0o755)
    with mock.patch.dict("os.environ", {"PATH": f"{tmp_path}:{os.environ['PATH']}"}):
        inventory = collectors.read_smi_csv()
    (gpu,) = inventory.gpus
    assert (gpu.memory_used_mib, [p.pid for p in gpu.processes]) == (21453, [435])


@pytest.mark.docker
def test_docker_probe_without_gpu_support_says_why(docker_client: Any, busybox_image: str) -> None:
    import docker.errors
    from docker.models.containers import ContainerCollection

    created = []
    original = ContainerCollection.create

    def create(self: ContainerCollection, *args: Any, **kwargs: Any) -> Any:
        created.append(original(self, *args, **kwargs))
        return created[-1]

    with (
        mock.patch.object(ContainerCollection, "create", autospec=True, side_effect=create),
        pytest.raises(CollectorError) as error,
    ):
        read_docker_smi(docker_client, image=busybox_image)
    message = str(error.value)
    assert "NVIDIA Container Toolkit" in message
    assert 'could not select device driver "" with capabilities: [[gpu]]' in message
    (probe,) = created
    with pytest.raises(docker.errors.NotFound):  # the probe container was removed
        docker_client.containers.get(probe.id)


@pytest.mark.docker
def test_full_chain_on_this_machine_marks_every_source_failed(
    docker_client: Any, busybox_image: str, settings: Any
) -> None:
    settings.BERTH_GPU_PROBE_IMAGE = busybox_image
    result = collect(client=docker_client)
    assert result.inventory is None
    assert [f.source for f in result.failures] == list(Source.ORDER)
    assert all(f.error for f in result.failures)


def test_no_module_counts_out_gpu_indices() -> None:
    """Lesson 5: a ``range(count)`` fallback picked busy GPUs. The only loop over a count in
    the gpus app is NVML's handle enumeration, whose indices are then read from each device."""
    root = Path(__file__).resolve().parent.parent / "gpus"
    loops = [
        f"{path.relative_to(root)}: {line.strip()}"
        for path in root.rglob("*.py")
        for line in path.read_text().splitlines()
        if "range(" in line and not line.lstrip().startswith("#")
    ]
    assert loops == ["collectors.py: for position in range(count):"]
