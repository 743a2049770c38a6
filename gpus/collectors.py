"""Reading a host's GPUs: one adapter in front of four sources, tried in order.

::

    collection = collect(docker_endpoint="")       # Collection(inventory | None, failures)

1. **NVML** in this process (``pynvml`` from nvidia-ml-py), initialised once per process, with the
   v2 memory call (v1 counts the driver's reserve as used).
2. **nvidia-smi --query-gpu** CSV (plus ``--query-compute-apps`` for processes) on this machine.
3. **nvidia-smi -q -x** on this machine.
4. **nvidia-smi -q -x in a container** through the Docker SDK with every GPU requested, for an
   agent that runs where neither the library nor the binary exist.

The first source that reads every GPU with an index and a UUID wins; each failure before it is
kept with its error. When every source fails the result has no inventory, and the caller marks
the host ``inventory unavailable``: nothing here invents a list of GPUs.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from django.conf import settings

from core import naming
from gpus.parsers import (
    QUERY_APPS_FIELDS,
    QUERY_GPU_FIELDS,
    ParseError,
    parse_nvml_json,
    parse_query_csv,
    parse_smi_xml,
)
from gpus.readings import Collection, Inventory, Source, SourceFailure

SMI_TIMEOUT_S = 30
MAX_ERROR = 500


class CollectorError(Exception):
    """A source could not read the GPUs; the message is shown to people as it is."""


# --- NVML --------------------------------------------------------------------------------------


class Nvml:
    """The process-wide NVML session. ``nvmlInit`` is expensive (NVIDIA/mig-parted#332), so it
    runs once per process and the library stays initialised; a failed init is retried on the
    next collection (a driver may be installed later)."""

    def __init__(self, library: Any = None):
        self._library = library
        self._ready = False
        self._lock = threading.Lock()

    def library(self) -> Any:
        with self._lock:
            if self._library is None:
                self._library = importlib.import_module("pynvml")
            if not self._ready:
                self._library.nvmlInit()
                self._ready = True
            return self._library

    def dump(self) -> dict[str, Any]:
        """Everything Berth reads from NVML, in the JSON shape :func:`parse_nvml_json` reads
        (and that ``gpu_report`` accepts). Indices are NVML's own enumeration."""
        nvml = self.library()
        data: dict[str, Any] = {
            "driver_version": _optional(nvml, nvml.nvmlSystemGetDriverVersion),
            "devices": [],
        }
        count = nvml.nvmlDeviceGetCount()
        data["device_count"] = count
        # The one loop over a count in the inventory: NVML hands out handles by position
        # 0..count-1, and each device's index is then read back from the device itself.
        for position in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(position)
            data["devices"].append(_nvml_device(nvml, nvml.nvmlDeviceGetIndex(handle), handle))
        return data


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _optional(nvml: Any, call: Callable[..., Any], *args: Any) -> Any:
    """A field a GPU may not support (power on some boards, MIG on pre-Ampere): None."""
    try:
        return _text(call(*args))
    except nvml.NVMLError:
        return None


def _nvml_device(nvml: Any, index: int, handle: Any) -> dict[str, Any]:
    device: dict[str, Any] = {
        "index": index,
        "name": _text(nvml.nvmlDeviceGetName(handle)),
        "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
    }
    pci = _optional(nvml, nvml.nvmlDeviceGetPciInfo, handle)
    device["pci_bus_id"] = {"busId": _text(pci.busId)} if pci is not None else None
    device.update(_nvml_memory(nvml, handle))
    utilization = _optional(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
    device["utilization"] = (
        {"gpu": utilization.gpu, "memory": utilization.memory} if utilization else None
    )
    device["temperature_c"] = _optional(
        nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
    )
    device["power_usage_mw"] = _optional(nvml, nvml.nvmlDeviceGetPowerUsage, handle)
    device["power_limit_mw"] = _optional(nvml, nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
    mig = _optional(nvml, nvml.nvmlDeviceGetMigMode, handle)
    device["mig_mode"] = list(mig) if mig is not None else None
    capability = _optional(nvml, nvml.nvmlDeviceGetCudaComputeCapability, handle)
    device["cuda_compute_capability"] = list(capability) if capability is not None else None
    device["persistence_mode"] = _optional(nvml, nvml.nvmlDeviceGetPersistenceMode, handle)
    processes = _optional(nvml, nvml.nvmlDeviceGetComputeRunningProcesses, handle)
    device["compute_processes"] = (
        None
        if processes is None
        else [{"pid": p.pid, "usedGpuMemory": p.usedGpuMemory} for p in processes]
    )
    return device


def _nvml_memory(nvml: Any, handle: Any) -> dict[str, Any]:
    try:
        memory = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
        return {
            "memory_info_v2": {
                "total": memory.total,
                "reserved": memory.reserved,
                "free": memory.free,
                "used": memory.used,
            }
        }
    except nvml.NVMLError:
        # Drivers before the v2 call: v1 counts the reserve as used, which only overstates use.
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return {"memory_info": {"total": memory.total, "free": memory.free, "used": memory.used}}


NVML = Nvml()


def read_nvml() -> Inventory:
    try:
        dump = NVML.dump()
    except ImportError as exc:
        raise CollectorError(f"pynvml is not importable: {exc}") from None
    except Exception as exc:  # pynvml raises NVMLError subclasses built at run time
        raise CollectorError(f"NVML: {type(exc).__name__}: {exc}") from None
    return parse_nvml_json(dump)


# --- nvidia-smi on this machine ----------------------------------------------------------------


def _smi(*args: str) -> str:
    binary = shutil.which("nvidia-smi")
    if binary is None:
        raise CollectorError("nvidia-smi is not installed on this machine (not on PATH)")
    try:
        # Exec-style: absolute binary, fixed arguments, a timeout, never a shell.
        result = subprocess.run(
            [os.path.abspath(binary), *args],
            capture_output=True,
            text=True,
            timeout=SMI_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise CollectorError(f"nvidia-smi did not answer within {SMI_TIMEOUT_S} s") from None
    except OSError as exc:
        raise CollectorError(f"nvidia-smi could not be started: {exc}") from None
    if result.returncode != 0:
        message = (result.stdout + result.stderr).strip() or "no output"
        raise CollectorError(f"nvidia-smi exited with {result.returncode}: {message}")
    return result.stdout


def read_smi_csv() -> Inventory:
    gpus = _smi(f"--query-gpu={','.join(QUERY_GPU_FIELDS)}", "--format=csv")
    apps = _smi(f"--query-compute-apps={','.join(QUERY_APPS_FIELDS)}", "--format=csv")
    return parse_query_csv(gpus, apps=apps)


def read_smi_xml() -> Inventory:
    return parse_smi_xml(_smi("-q", "-x"))


# --- nvidia-smi in a container -----------------------------------------------------------------


def docker_client(endpoint: str = "") -> Any:
    """A Docker SDK client for ``endpoint`` ('' = DOCKER_HOST or the local socket)."""
    import docker

    if endpoint:
        return docker.DockerClient(base_url=endpoint, timeout=settings.BERTH_GPU_PROBE_TIMEOUT_S)
    return docker.from_env(timeout=settings.BERTH_GPU_PROBE_TIMEOUT_S)


def read_docker_smi(client: Any, image: str | None = None) -> Inventory:
    """Run ``nvidia-smi -q -x`` in a throw-away container with every GPU requested. The NVIDIA
    runtime mounts nvidia-smi into it; the container is removed whatever happens."""
    import docker.errors
    from docker.types import DeviceRequest

    image = image or settings.BERTH_GPU_PROBE_IMAGE
    _ensure_image(client, image)
    container = client.containers.create(
        image,
        command=["nvidia-smi", "-q", "-x"],
        device_requests=[DeviceRequest(count=-1, capabilities=[["gpu"]])],
        environment={"NVIDIA_DRIVER_CAPABILITIES": "utility"},
        labels={naming.PROBE_LABEL: "gpu-inventory"},
        network_disabled=True,
    )
    try:
        try:
            container.start()
        except docker.errors.APIError as exc:
            raise CollectorError(_docker_gpu_error(exc)) from None
        status = container.wait(timeout=settings.BERTH_GPU_PROBE_TIMEOUT_S)
        output = container.logs(stdout=True, stderr=False).decode(errors="replace")
        if status.get("StatusCode") != 0:
            errors = container.logs(stdout=False, stderr=True).decode(errors="replace")
            raise CollectorError(
                f"nvidia-smi in {image} exited with {status.get('StatusCode')}: "
                f"{(errors or output).strip()[:MAX_ERROR]}"
            )
    finally:
        container.remove(force=True)
    inventory = parse_smi_xml(output)
    return Inventory(
        source=Source.DOCKER_SMI,
        gpus=inventory.gpus,
        driver_version=inventory.driver_version,
        notes=inventory.notes,
    )


def _ensure_image(client: Any, image: str) -> None:
    import docker.errors

    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        try:
            client.images.pull(image)
        except docker.errors.APIError as exc:
            raise CollectorError(
                f"probe image {image} is not on the host and could not be pulled: "
                f"{_explanation(exc)}; pull it there or set BERTH_GPU_PROBE_IMAGE"
            ) from None


def _explanation(exc: Exception) -> str:
    return str(getattr(exc, "explanation", None) or exc)


def _docker_gpu_error(exc: Exception) -> str:
    text = _explanation(exc)
    if "could not select device driver" in text:
        return (
            "Docker cannot give containers GPUs (the NVIDIA Container Toolkit is not installed "
            f"or not configured for this engine): {text}"
        )
    return f"Docker could not start the nvidia-smi container: {text}"


def nvidia_runtime_available(client: Any) -> bool:
    """Whether the engine lists the ``nvidia`` runtime (``docker info``)."""
    return "nvidia" in (client.info().get("Runtimes") or {})


# --- the adapter -------------------------------------------------------------------------------


def collect(
    docker_endpoint: str = "",
    *,
    sources: tuple[str, ...] = Source.ORDER,
    client: Any = None,
    now: datetime | None = None,
) -> Collection:
    """Try ``sources`` in order and return the first complete inventory with the failures
    before it, or no inventory and every failure."""
    failures: list[SourceFailure] = []
    for source in sources:
        try:
            inventory = _read(source, docker_endpoint, client)
            _check_complete(inventory)
        except Exception as exc:  # every source fails in its own way; each is reported
            failures.append(SourceFailure(source, _failure_text(exc)))
            continue
        stamped = Inventory(
            source=inventory.source,
            gpus=inventory.gpus,
            collected_at=now or datetime.now(tz=UTC),
            driver_version=inventory.driver_version,
            notes=inventory.notes,
        )
        return Collection(stamped, tuple(failures))
    return Collection(None, tuple(failures))


def _read(source: str, docker_endpoint: str, client: Any) -> Inventory:
    if source == Source.NVML:
        return read_nvml()
    if source == Source.SMI_CSV:
        return read_smi_csv()
    if source == Source.SMI_XML:
        return read_smi_xml()
    if source == Source.DOCKER_SMI and client is not None:
        return read_docker_smi(client)
    if source == Source.DOCKER_SMI:
        with contextlib.closing(docker_client(docker_endpoint)) as opened:
            return read_docker_smi(opened)
    raise CollectorError(f"unknown source {source!r}")


def _check_complete(inventory: Inventory) -> None:
    """Refuse a reading Berth could not place on: every GPU needs the index and UUID its source
    stated (never a position or a count filled in)."""
    if not inventory.gpus:
        raise CollectorError("the source answered but listed no GPUs")
    for gpu in inventory.gpus:
        if gpu.index is None or not gpu.uuid:
            raise CollectorError(
                f"the source listed a GPU without an index or UUID ({gpu.name or 'unnamed'}); "
                "refusing to guess it"
            )
    indices = [gpu.index for gpu in inventory.gpus]
    if len(set(indices)) != len(indices):
        raise CollectorError(f"the source listed the same GPU index twice ({indices})")


def _failure_text(exc: Exception) -> str:
    if isinstance(exc, CollectorError | ParseError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {_explanation(exc)}"
    return text[:MAX_ERROR]
