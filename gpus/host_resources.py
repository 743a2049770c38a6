"""The host's own memory and cores, as the agent reads them on the machine it runs on (the GPU
host, beside its Docker engine). CPU deployments are planned and reserved against these::

    resources = read_host_resources()
    resources.memory_total_bytes, resources.memory_available_bytes, resources.cpu_count
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MEMINFO = Path("/proc/meminfo")
KIB = 1024


@dataclass(frozen=True)
class HostResources:
    """Memory in bytes (``MemAvailable``: what can be allocated without swapping, as the kernel
    estimates it) and the cores this process may run on."""

    memory_total_bytes: int
    memory_available_bytes: int
    cpu_count: int


def parse_meminfo(text: str) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes from ``/proc/meminfo``'s text; a field missing raises
    ValueError naming it."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[name.strip()] = int(fields[0]) * (KIB if fields[-1:] == ["kB"] else 1)
    missing = [name for name in ("MemTotal", "MemAvailable") if name not in values]
    if missing:
        raise ValueError(f"/proc/meminfo has no {', '.join(missing)}")
    return values["MemTotal"], values["MemAvailable"]


def read_host_resources(meminfo: Path = MEMINFO) -> HostResources:
    total, available = parse_meminfo(meminfo.read_text())
    return HostResources(total, available, len(os.sched_getaffinity(0)))
