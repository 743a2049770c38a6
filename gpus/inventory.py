"""Storing what collectors read: current GPU rows, history, host state, retention.

::

    store_collection(host, collection)   # one transaction per host and round
    heartbeat(host)                      # the agent is alive
    compact_history(host)                # roll raw history up and drop what is past retention

Each round writes the host's snapshots in one batched INSERT and its current rows in one
batched UPDATE (batched inserts are an order of magnitude faster than one row at a time:
``benchmarks/inventory_ingest.py``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta
from statistics import fmean

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

import audit
from audit.actions import Action, Outcome
from gpus.attribution import memory_split
from gpus.host_resources import HostResources, read_host_resources
from gpus.models import Gpu, GpuSnapshot, Host, HostStatus, Resolution
from gpus.readings import Collection, GpuReading, Inventory
from gpus.selection import GpuState, HostGpus, Policy

CURRENT_FIELDS = [
    "uuid",
    "name",
    "pci_bus_id",
    "memory_total_mib",
    "compute_capability",
    "mig_enabled",
    "present",
    "source",
    "seen_at",
    "memory_used_mib",
    "memory_free_mib",
    "memory_berth_mib",
    "memory_foreign_mib",
    "utilization_gpu_pct",
    "temperature_c",
    "power_w",
    "power_limit_w",
    "processes",
]


def heartbeat(
    host: Host, now: datetime | None = None, resources: HostResources | None = None
) -> None:
    """Record that the host's agent is alive, with the memory and cores of the machine it runs
    on (read from ``/proc`` unless given; CPU deployments are planned against them): one
    UPDATE, no database read."""
    resources = resources or read_host_resources()
    Host.objects.filter(pk=host.pk).update(
        last_heartbeat=now or timezone.now(),
        memory_total_bytes=resources.memory_total_bytes,
        memory_available_bytes=resources.memory_available_bytes,
        cpu_count=resources.cpu_count,
    )


def store_collection(
    host: Host,
    collection: Collection,
    now: datetime | None = None,
    *,
    nvidia_runtime: bool | None = None,
) -> None:
    """Apply one collection round to ``host``: on success its GPU rows and history; on
    failure ``inventory unavailable`` with every source's error and its GPUs marked not
    present, so placement has nothing stale to choose from. Transitions are audited."""
    now = now or timezone.now()
    with transaction.atomic():
        host = Host.objects.select_for_update().get(pk=host.pk)
        previous = host.status
        if collection.inventory is None:
            _mark_unavailable(host, collection, now)
        else:
            _store_inventory(host, collection.inventory, now)
            host.status = HostStatus.ONLINE
            host.inventory_source = collection.inventory.source
            host.driver_version = collection.inventory.driver_version or ""
        host.inventory_errors = [
            {"source": failure.source, "error": failure.error} for failure in collection.failures
        ]
        host.last_collected = host.last_heartbeat = now
        if nvidia_runtime is not None:
            host.nvidia_runtime = nvidia_runtime
        host.save()
        if host.status == previous:
            _relax_commit()
        else:
            _audit_transition(host, previous)


def _relax_commit() -> None:
    """A round that changes nothing but readings need not wait for the WAL flush (PostgreSQL's
    ``synchronous_commit = off`` for this transaction only): a database crash can lose the
    last fraction of a second of readings — the next round replaces them — never a state
    change or an audit event, which commit as usual. Each round's flush otherwise bounds an
    agent's ingest to the disk's fsync rate (benchmarks/inventory_ingest.py)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO OFF")


def _mark_unavailable(host: Host, collection: Collection, now: datetime) -> None:
    host.status = HostStatus.INVENTORY_UNAVAILABLE
    host.inventory_source = ""
    host.gpus.filter(present=True).update(present=False)


def _audit_transition(host: Host, previous: str) -> None:
    if host.status == previous:
        return
    if host.status == HostStatus.INVENTORY_UNAVAILABLE:
        audit.record(
            Action.HOST_INVENTORY_UNAVAILABLE,
            target=host,
            outcome=Outcome.FAILED,
            errors=host.inventory_errors,
        )
    elif previous == HostStatus.INVENTORY_UNAVAILABLE:
        audit.record(Action.HOST_INVENTORY_RESTORED, target=host, source=host.inventory_source)


def _store_inventory(host: Host, inventory: Inventory, now: datetime) -> None:
    existing = {gpu.index: gpu for gpu in host.gpus.all()}
    seen: set[int] = set()
    new, changed = [], []
    for reading in inventory.gpus:
        seen.add(reading.index)
        gpu = existing.get(reading.index) or Gpu(host=host, index=reading.index)
        appeared = gpu.pk is None or not gpu.present or gpu.uuid != reading.uuid
        _apply(gpu, reading, inventory.source, now)
        (new if gpu.pk is None else changed).append(gpu)
        if appeared:
            audit.record(Action.GPU_APPEARED, target=host, index=gpu.index, uuid=gpu.uuid)
    Gpu.objects.bulk_create(new)
    _update_current(changed)
    gone = [gpu for index, gpu in existing.items() if index not in seen and gpu.present]
    for gpu in gone:
        audit.record(Action.GPU_DISAPPEARED, target=host, index=gpu.index, uuid=gpu.uuid)
    Gpu.objects.filter(pk__in=[gpu.pk for gpu in gone]).update(present=False)
    GpuSnapshot.objects.bulk_create(
        [_snapshot(gpu, inventory.source, now) for gpu in (*new, *changed)]
    )


def _update_current(gpus: list[Gpu]) -> None:
    """Write the current fields of ``gpus`` in one statement executed per row (executemany).
    ``bulk_update`` builds a CASE per field and row: for 18 fields x 8 GPUs that expression work
    cost ~20 ms of CPU per host and round, 6-7x this (benchmarks/inventory_ingest.py)."""
    if not gpus:
        return
    fields = [Gpu._meta.get_field(name) for name in CURRENT_FIELDS]
    quote = connection.ops.quote_name
    assignments = ", ".join(f"{quote(field.column)} = %s" for field in fields)
    table = quote(Gpu._meta.db_table)
    # Names come from the model, values are bound parameters.
    sql = f"UPDATE {table} SET {assignments} WHERE {quote('id')} = %s"  # noqa: S608
    rows = [
        [field.get_db_prep_save(getattr(gpu, field.attname), connection) for field in fields]
        + [gpu.pk]
        for gpu in gpus
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, rows)


def _apply(gpu: Gpu, reading: GpuReading, source: str, now: datetime) -> None:
    berth, foreign = memory_split(reading)
    gpu.uuid = reading.uuid or ""
    gpu.name = reading.name or ""
    gpu.pci_bus_id = reading.pci_bus_id or ""
    gpu.memory_total_mib = reading.memory_total_mib
    gpu.compute_capability = reading.compute_capability or ""
    gpu.mig_enabled = reading.mig_enabled
    gpu.present = True
    gpu.source = source
    gpu.seen_at = now
    gpu.memory_used_mib = reading.memory_used_mib
    gpu.memory_free_mib = reading.free_mib
    gpu.memory_berth_mib = berth
    gpu.memory_foreign_mib = foreign
    gpu.utilization_gpu_pct = reading.utilization_gpu_pct
    gpu.temperature_c = reading.temperature_c
    gpu.power_w = reading.power_w
    gpu.power_limit_w = reading.power_limit_w
    gpu.processes = [process.as_json() for process in reading.processes or ()]


def _snapshot(gpu: Gpu, source: str, now: datetime) -> GpuSnapshot:
    return GpuSnapshot(
        gpu=gpu,
        time=now,
        source=source,
        memory_used_mib=gpu.memory_used_mib,
        memory_total_mib=gpu.memory_total_mib,
        memory_foreign_mib=gpu.memory_foreign_mib,
        utilization_gpu_pct=gpu.utilization_gpu_pct,
        temperature_c=gpu.temperature_c,
        power_w=gpu.power_w,
        processes=gpu.processes,
    )


# --- retention ---------------------------------------------------------------------------------


def compact_history(host: Host, now: datetime | None = None) -> dict[str, int]:
    """Roll raw snapshots older than the raw window into one row per GPU per bucket, and
    delete roll-ups older than their window. Idempotent: raw rows are deleted in the same
    transaction that writes their roll-up, so a rerun finds nothing to roll up twice."""
    now = now or timezone.now()
    bucket = timedelta(minutes=settings.BERTH_GPU_ROLLUP_MINUTES)
    # On a bucket boundary, so a bucket is never split between two runs.
    raw_cutoff = _bucket_start(now - timedelta(hours=settings.BERTH_GPU_RAW_RETENTION_H), bucket)
    rollup_cutoff = now - timedelta(days=settings.BERTH_GPU_ROLLUP_RETENTION_D)
    snapshots = GpuSnapshot.objects.filter(gpu__host=host)
    with transaction.atomic():
        raw = snapshots.filter(
            resolution=Resolution.RAW, time__lt=raw_cutoff, time__gte=rollup_cutoff
        )
        rows = list(
            raw.values_list(
                "id",
                "gpu_id",
                "time",
                "source",
                "memory_used_mib",
                "memory_total_mib",
                "memory_foreign_mib",
                "utilization_gpu_pct",
                "temperature_c",
                "power_w",
            )
        )
        rollups = _rollups(rows, bucket)
        GpuSnapshot.objects.bulk_create(rollups)
        rolled = GpuSnapshot.objects.filter(pk__in=[row[0] for row in rows]).delete()[0]
        expired = snapshots.filter(time__lt=rollup_cutoff).delete()[0]
    return {"rolled_up": rolled, "rollups": len(rollups), "expired": expired}


def _rollups(rows: Iterable[tuple], bucket: timedelta) -> list[GpuSnapshot]:
    groups: dict[tuple[int, datetime], list[tuple]] = defaultdict(list)
    for row in rows:
        groups[(row[1], _bucket_start(row[2], bucket))].append(row)
    return [
        GpuSnapshot(
            gpu_id=gpu_id,
            time=start,
            resolution=Resolution.ROLLUP,
            source=members[-1][3],
            memory_used_mib=_max(row[4] for row in members),
            memory_total_mib=_max(row[5] for row in members),
            memory_foreign_mib=_max(row[6] for row in members),
            utilization_gpu_pct=_mean(row[7] for row in members),
            temperature_c=_mean(row[8] for row in members),
            power_w=_mean([row[9] for row in members], digits=2),
            samples=len(members),
        )
        for (gpu_id, start), members in sorted(groups.items())
    ]


def _bucket_start(time: datetime, bucket: timedelta) -> datetime:
    seconds = int(bucket.total_seconds())
    offset = int(time.timestamp()) % seconds
    return time - timedelta(seconds=offset, microseconds=time.microsecond)


def _max(values: Iterable[int | None]) -> int | None:
    known = [value for value in values if value is not None]
    return max(known) if known else None


def _mean(values: Iterable[float | None], digits: int = 0) -> float | int | None:
    known = [value for value in values if value is not None]
    if not known:
        return None
    average = round(fmean(known), digits)
    return int(average) if digits == 0 else average


# --- inputs to selection -----------------------------------------------------------------------


def stale_after() -> timedelta:
    """Readings older than this are refused by placement (BERTH_GPU_STALE_AFTER intervals)."""
    return timedelta(seconds=settings.BERTH_AGENT_INTERVAL_S * settings.BERTH_GPU_STALE_AFTER)


def policy() -> Policy:
    return Policy(
        max_age=stale_after(), foreign_threshold_mib=settings.BERTH_GPU_FOREIGN_THRESHOLD_MIB
    )


def gpu_state(gpu: Gpu) -> GpuState:
    """The plain data selection needs from one current GPU row."""
    return GpuState(
        host=gpu.host.name,
        index=gpu.index,
        uuid=gpu.uuid,
        name=gpu.name,
        memory_total_mib=gpu.memory_total_mib,
        memory_free_mib=gpu.memory_free_mib,
        memory_foreign_mib=gpu.memory_foreign_mib,
        utilization_gpu_pct=gpu.utilization_gpu_pct,
        mig_enabled=gpu.mig_enabled,
        seen_at=gpu.seen_at,
        present=gpu.present,
        foreign_processes=tuple(
            f"pid {p['pid']} {p.get('name') or '?'}"
            + (f" in {p['container_name']}" if p.get("container_name") else "")
            for p in gpu.foreign_processes
        ),
    )


def fleet(hosts: Iterable[Host] | None = None, now: datetime | None = None) -> list[HostGpus]:
    """Every host (or ``hosts``) with its current GPU rows, ready for ``select_on_fleet``:
    two queries whatever the number of GPUs."""
    now = now or timezone.now()
    queryset = (
        Host.objects.all()
        if hosts is None
        else Host.objects.filter(pk__in=[host.pk for host in hosts])
    )
    result = []
    for host in queryset.prefetch_related("gpus"):
        states = tuple(gpu_state(gpu) for gpu in host.gpus.all())
        result.append(HostGpus(name=host.name, gpus=states, online=host.placeable(now)))
    return result
