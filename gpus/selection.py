"""Choosing GPUs for a deployment: pure functions over plain data, no database, no I/O.

::

    selection = select_gpus(states, count=2, memory_mib=30_000, allocated={"GPU-..."},
                            now=now, max_age=timedelta(seconds=30), foreign_threshold_mib=1024)
    selection.chosen     # the GPUs, or () with selection.summary saying why
    selection.rejected   # (gpu, reason, detail) for every GPU that could not be used

A GPU is usable when its host is online, its reading is fresh, it is not allocated, not in MIG
mode, foreign processes hold no more than the threshold on it, and its *free* memory (what the
source read, so other people's processes are already subtracted: vLLM's start-up check uses
free memory too) covers the need. Among usable GPUs of one model, the least loaded come first
(most free memory, then lowest utilization, then lowest index), so the result is deterministic.
Chosen GPUs are always of one model. Only GPUs given in ``states`` can be returned: the
function never makes up an index.

Allocation itself (the database row that holds the GPUs) belongs to the deployment.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum


class Reason(StrEnum):
    NOT_PRESENT = "not_present"
    HOST_OFFLINE = "host_offline"
    STALE = "stale"
    ALLOCATED = "allocated"
    MIG = "mig"
    FOREIGN_PROCESS = "foreign_process"
    NOT_ENOUGH_FREE_MEMORY = "not_enough_free_memory"
    TOO_FEW_OF_MODEL = "too_few_of_model"


@dataclass(frozen=True, slots=True)
class GpuState:
    """What selection needs to know about one GPU (built from ``gpus.models.Gpu``)."""

    host: str
    index: int
    uuid: str
    name: str
    memory_total_mib: int | None
    memory_free_mib: int | None
    memory_foreign_mib: int | None
    utilization_gpu_pct: int | None
    mig_enabled: bool | None
    seen_at: datetime | None
    present: bool = True
    foreign_processes: tuple[str, ...] = ()  # "pid 435 python3" — named in the reason

    def rank(self) -> tuple[int, int, int]:
        """Least loaded first: most free memory, lowest utilization, lowest index."""
        return (-(self.memory_free_mib or 0), self.utilization_gpu_pct or 0, self.index)


@dataclass(frozen=True, slots=True)
class Rejection:
    gpu: GpuState
    reason: Reason
    detail: str


@dataclass(frozen=True)
class Selection:
    """The GPUs chosen on one host, or none, with the reason for every GPU not usable."""

    host: str
    chosen: tuple[GpuState, ...]
    rejected: tuple[Rejection, ...]
    summary: str = ""
    spare: int = 0  # usable GPUs left over on the host after this choice

    @property
    def ok(self) -> bool:
        return bool(self.chosen)

    def reasons(self) -> dict[int, Reason]:
        return {rejection.gpu.index: rejection.reason for rejection in self.rejected}


@dataclass(frozen=True)
class Need:
    """What the deployment asks for: ``count`` GPUs with ``memory_mib`` free on each."""

    count: int
    memory_mib: int
    model: str | None = None  # a GPU model name to insist on (None: any, but one model)

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be at least 1, got {self.count}")
        if self.memory_mib < 0:
            raise ValueError(f"memory_mib must not be negative, got {self.memory_mib}")


@dataclass(frozen=True)
class Policy:
    """The thresholds placement applies (from settings, see ``gpus.inventory.policy``)."""

    max_age: timedelta
    foreign_threshold_mib: int


def rejection(
    gpu: GpuState,
    need: Need,
    policy: Policy,
    *,
    now: datetime,
    allocated: Collection[str],
    host_online: bool = True,
) -> Rejection | None:
    """Why ``gpu`` cannot take part, or None when it can. The first reason that applies, in
    the order a person would fix them."""
    if not gpu.present:
        return Rejection(gpu, Reason.NOT_PRESENT, "the last collection on its host did not list it")
    if not host_online:
        return Rejection(gpu, Reason.HOST_OFFLINE, f"host {gpu.host} has no recent heartbeat")
    if gpu.seen_at is None or now - gpu.seen_at > policy.max_age:
        age = "never read" if gpu.seen_at is None else f"read {_seconds(now - gpu.seen_at)} ago"
        limit = _seconds(policy.max_age)
        return Rejection(gpu, Reason.STALE, f"{age}; readings older than {limit} are refused")
    if gpu.uuid in allocated:
        return Rejection(gpu, Reason.ALLOCATED, "allocated to a Berth deployment")
    if gpu.mig_enabled:
        return Rejection(gpu, Reason.MIG, "MIG mode is on: Berth places on whole GPUs only")
    foreign = gpu.memory_foreign_mib
    if foreign is None or foreign > policy.foreign_threshold_mib:
        return Rejection(gpu, Reason.FOREIGN_PROCESS, _foreign_detail(gpu, policy))
    if need.model is not None and gpu.name != need.model:
        return Rejection(gpu, Reason.TOO_FEW_OF_MODEL, f"{gpu.name}, not {need.model}")
    if gpu.memory_free_mib is None or gpu.memory_free_mib < need.memory_mib:
        free = "unknown" if gpu.memory_free_mib is None else f"{gpu.memory_free_mib:,} MiB"
        return Rejection(
            gpu,
            Reason.NOT_ENOUGH_FREE_MEMORY,
            f"{free} free, {need.memory_mib:,} MiB needed",
        )
    return None


def _foreign_detail(gpu: GpuState, policy: Policy) -> str:
    if gpu.memory_foreign_mib is None:
        return "used memory unknown, so foreign use cannot be ruled out"
    who = ", ".join(gpu.foreign_processes) or "processes not visible to the agent"
    return (
        f"{gpu.memory_foreign_mib:,} MiB held by processes Berth did not start ({who}); "
        f"the limit is {policy.foreign_threshold_mib:,} MiB"
    )


def _seconds(delta: timedelta) -> str:
    return f"{int(delta.total_seconds())} s"


def select_gpus(
    gpus: Iterable[GpuState],
    need: Need,
    policy: Policy,
    *,
    now: datetime,
    allocated: Collection[str] = frozenset(),
    host: str = "",
    host_online: bool = True,
) -> Selection:
    """Choose ``need.count`` GPUs of one model on one host (see the module docstring)."""
    gpus = list(gpus)
    rejected: list[Rejection] = []
    by_model: dict[str, list[GpuState]] = defaultdict(list)
    for gpu in gpus:
        why = rejection(gpu, need, policy, now=now, allocated=allocated, host_online=host_online)
        if why is None:
            by_model[gpu.name].append(gpu)
        else:
            rejected.append(why)
    host = host or (gpus[0].host if gpus else "")
    best: tuple[tuple, str, tuple[GpuState, ...]] | None = None
    for model, usable in by_model.items():
        if len(usable) < need.count:
            continue
        ranked = tuple(sorted(usable, key=GpuState.rank)[: need.count])
        key = (tuple(gpu.rank() for gpu in ranked), model)
        if best is None or key < best[0]:
            best = (key, model, ranked)
    if best is None:
        rejected.extend(_too_few(by_model, need))
        summary = _summary(gpus, rejected, need)
        return Selection(host, (), tuple(sorted(rejected, key=_by_index)), summary)
    _key, model, chosen = best
    spare = len(by_model[model]) - need.count
    return Selection(host, chosen, tuple(sorted(rejected, key=_by_index)), spare=spare)


def _by_index(rejection: Rejection) -> int:
    return rejection.gpu.index


def _too_few(by_model: Mapping[str, list[GpuState]], need: Need) -> list[Rejection]:
    return [
        Rejection(
            gpu,
            Reason.TOO_FEW_OF_MODEL,
            f"only {len(usable)} usable {model} GPU(s) here, {need.count} of one model needed",
        )
        for model, usable in by_model.items()
        for gpu in usable
    ]


def _summary(gpus: list[GpuState], rejected: list[Rejection], need: Need) -> str:
    if not gpus:
        return "no GPUs are known on this host"
    counts: dict[str, int] = defaultdict(int)
    for item in rejected:
        counts[item.reason.value] += 1
    reasons = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in counts.items())
    return (
        f"{need.count} GPU(s) with {need.memory_mib:,} MiB free each needed; "
        f"none chosen ({reasons})"
    )


@dataclass(frozen=True)
class HostGpus:
    """One host's GPUs and whether the host is placeable (heartbeat, inventory)."""

    name: str
    gpus: tuple[GpuState, ...]
    online: bool = True


@dataclass(frozen=True)
class FleetSelection:
    """The host chosen for a request, and every host's selection (for the explanation)."""

    choice: Selection | None
    per_host: dict[str, Selection] = field(default_factory=dict)


def select_on_fleet(
    hosts: Iterable[HostGpus],
    need: Need,
    policy: Policy,
    *,
    now: datetime,
    allocated: Collection[str] = frozenset(),
) -> FleetSelection:
    """Choose one host and its GPUs. Hosts that would be left with the fewest usable GPUs
    win (pack partly used hosts, keep whole hosts free for large tensor-parallel groups, as
    HiveD, OSDI '20, reserves whole cells), then the least-loaded choice, then the host name. GPU
    combinations across hosts are never enumerated."""
    per_host: dict[str, Selection] = {}
    best: tuple[tuple, Selection] | None = None
    for host in hosts:
        selection = select_gpus(
            host.gpus,
            need,
            policy,
            now=now,
            allocated=allocated,
            host=host.name,
            host_online=host.online,
        )
        per_host[host.name] = selection
        if not selection.ok:
            continue
        key = (selection.spare, tuple(gpu.rank() for gpu in selection.chosen), host.name)
        if best is None or key < best[0]:
            best = (key, selection)
    return FleetSelection(best[1] if best else None, per_host)
