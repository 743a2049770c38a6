"""What a collector reads from a host: plain, immutable dataclasses, no Django.

Every source (NVML, ``nvidia-smi`` CSV or XML, ``nvidia-smi`` in a container) produces the same
shapes, so storage, pages and selection never care where a number came from; ``source`` says it.
``None`` always means "the source did not say" and is never replaced by a guess: a GPU whose
index was not read has ``index=None``, a source that does not list processes has
``processes=None`` (unknown), which is not the same as ``()`` (read: none running).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

MIB = 1024 * 1024


def bytes_to_mib(value: int | None) -> int | None:
    """Bytes to MiB, rounded to nearest as nvidia-smi prints them (21452.8 MiB -> 21453)."""
    if value is None:
        return None
    return (int(value) + MIB // 2) // MIB


class Source:
    """Names of the sources, in the order the collector tries them."""

    NVML = "nvml"
    SMI_CSV = "nvidia-smi-csv"
    SMI_XML = "nvidia-smi-xml"
    DOCKER_SMI = "docker-nvidia-smi"
    FILE = "file"

    ORDER = (NVML, SMI_CSV, SMI_XML, DOCKER_SMI)


@dataclass(frozen=True)
class ProcessReading:
    """A process holding memory on one GPU. ``used_memory_mib`` is None where the driver does
    not report it (Windows WDDM, some MIG set-ups). The container fields are filled by
    attribution (:mod:`gpus.attribution`) when the PID maps to a container."""

    pid: int
    used_memory_mib: int | None
    name: str = ""
    container_id: str = ""
    container_name: str = ""
    deployment: str = ""  # the container's ``berth.deployment`` label: Berth's own

    @property
    def is_berth(self) -> bool:
        return bool(self.deployment)

    def report(self) -> dict[str, Any]:
        return {"pid": self.pid, "used_memory_mib": self.used_memory_mib}

    def as_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "used_memory_mib": self.used_memory_mib,
            "name": self.name,
            "container_id": self.container_id,
            "container_name": self.container_name,
            "deployment": self.deployment,
        }


@dataclass(frozen=True)
class GpuReading:
    """One GPU as one source saw it at one moment."""

    index: int | None
    uuid: str | None
    name: str | None
    memory_total_mib: int | None
    memory_used_mib: int | None
    memory_reserved_mib: int | None = None
    memory_free_mib: int | None = None  # as the source printed it
    utilization_gpu_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    compute_capability: str | None = None
    mig_enabled: bool | None = None
    pci_bus_id: str | None = None
    processes: tuple[ProcessReading, ...] | None = None

    @property
    def free_mib(self) -> int | None:
        """Free memory: as read, else total - used - reserved (the driver's reserve is not
        usable by a process either)."""
        if self.memory_free_mib is not None:
            return self.memory_free_mib
        if self.memory_total_mib is None or self.memory_used_mib is None:
            return None
        reserved = self.memory_reserved_mib or 0
        return max(self.memory_total_mib - self.memory_used_mib - reserved, 0)

    def with_processes(self, processes: tuple[ProcessReading, ...] | None) -> GpuReading:
        return replace(self, processes=processes)

    def report(self) -> dict[str, Any]:
        """The stable shape ``manage.py gpu_report --json`` prints (checks outside the suite
        read it)."""
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "memory_total_mib": self.memory_total_mib,
            "memory_used_mib": self.memory_used_mib,
            "utilization_gpu_pct": self.utilization_gpu_pct,
            "temperature_c": self.temperature_c,
            "power_w": self.power_w,
            "processes": None
            if self.processes is None
            else [process.report() for process in self.processes],
        }


@dataclass(frozen=True)
class Inventory:
    """Every GPU one source read on one host, at ``collected_at``."""

    source: str
    gpus: tuple[GpuReading, ...]
    collected_at: datetime | None = None
    driver_version: str | None = None
    notes: tuple[str, ...] = ()  # what the source could not say (e.g. "index not listed")

    def report(self) -> dict[str, Any]:
        return {"gpus": [gpu.report() for gpu in self.gpus]}


@dataclass(frozen=True)
class SourceFailure:
    """Why one source gave no inventory; shown on the host's page as it is."""

    source: str
    error: str


@dataclass(frozen=True)
class Collection:
    """The outcome of one collection round: the first source that worked (or none), and the
    error of every source tried before it."""

    inventory: Inventory | None
    failures: tuple[SourceFailure, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.inventory is not None
