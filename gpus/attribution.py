"""Whose memory is it: map GPU processes to containers, and containers to Berth deployments.

A process inside a container labelled ``berth.deployment=<id>`` is Berth's own; every other
byte used on a GPU is *foreign*, including memory no listed process accounts for (a process in
another PID namespace, the driver's own use), because placement must not count on it::

    inventory = attribute(inventory, docker_client)
    berth_mib, foreign_mib = memory_split(gpu)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from core import naming
from gpus.readings import GpuReading, Inventory, ProcessReading


def container_pids(client: Any) -> dict[int, tuple[str, str, str]]:
    """Host PID -> (container id, container name, berth.deployment label) for every running
    container, from ``docker top`` (host PIDs, whatever PID namespace the agent runs in)."""
    owners: dict[int, tuple[str, str, str]] = {}
    for container in client.containers.list():
        try:
            top = client.api.top(container.id)
        except Exception:  # noqa: S112 - a container that exits between list and top has no PIDs
            continue
        titles = top.get("Titles") or []
        if "PID" not in titles:
            continue
        column = titles.index("PID")
        label = naming.deployment_of(container.labels)
        for row in top.get("Processes") or []:
            try:
                owners[int(row[column])] = (container.id, container.name, label)
            except (ValueError, IndexError):
                continue
    return owners


def attribute(inventory: Inventory, client: Any) -> Inventory:
    """The inventory with each process's container and deployment filled in where its PID
    belongs to a running container. Without processes there is nothing to ask Docker."""
    if not any(gpu.processes for gpu in inventory.gpus):
        return inventory
    owners = container_pids(client)
    return replace(inventory, gpus=tuple(_attributed(gpu, owners) for gpu in inventory.gpus))


def _attributed(gpu: GpuReading, owners: dict[int, tuple[str, str, str]]) -> GpuReading:
    if not gpu.processes:
        return gpu
    return gpu.with_processes(tuple(_owned(process, owners) for process in gpu.processes))


def _owned(process: ProcessReading, owners: dict[int, tuple[str, str, str]]) -> ProcessReading:
    owner = owners.get(process.pid)
    if owner is None:
        return process
    container_id, container_name, deployment = owner
    return replace(
        process,
        container_id=container_id[:12],
        container_name=container_name,
        deployment=deployment,
    )


def memory_split(gpu: GpuReading) -> tuple[int, int | None]:
    """(MiB used by Berth deployments, MiB used by anything else). Foreign is None when the
    source did not report used memory."""
    berth = sum(process.used_memory_mib or 0 for process in gpu.processes or () if process.is_berth)
    if gpu.memory_used_mib is None:
        return berth, None
    return berth, max(gpu.memory_used_mib - berth, 0)
