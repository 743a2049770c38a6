"""GPU selection: busy GPUs are never chosen, stale data is refused, every rejection has its
reason, and the fast greedy choice equals a brute-force search on small cases."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpus.attribution import memory_split
from gpus.parsers import parse_any, parse_query_csv
from gpus.readings import GpuReading
from gpus.selection import (
    GpuState,
    HostGpus,
    Need,
    Policy,
    Reason,
    rejection,
    select_gpus,
    select_on_fleet,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
POLICY = Policy(max_age=timedelta(seconds=30), foreign_threshold_mib=1024)
H100 = Path(__file__).parent / "fixtures" / "gpu" / "h100-80gb"


def state_from(reading: GpuReading, host: str = "gpu-01", seen_at: datetime = NOW) -> GpuState:
    """What gpus.inventory.gpu_state builds from a stored row, built from a parsed reading."""
    _berth, foreign = memory_split(reading)
    return GpuState(
        host=host,
        index=reading.index,
        uuid=reading.uuid,
        name=reading.name,
        memory_total_mib=reading.memory_total_mib,
        memory_free_mib=reading.free_mib,
        memory_foreign_mib=foreign,
        utilization_gpu_pct=reading.utilization_gpu_pct,
        mig_enabled=reading.mig_enabled,
        seen_at=seen_at,
        foreign_processes=tuple(f"pid {p.pid} {p.name}" for p in reading.processes or ()),
    )


def gpu(index: int, free: int = 80_000, **changes) -> GpuState:
    base = GpuState(
        host="gpu-01",
        index=index,
        uuid=f"GPU-{index}",
        name="NVIDIA H100 80GB HBM3",
        memory_total_mib=81_559,
        memory_free_mib=free,
        memory_foreign_mib=0,
        utilization_gpu_pct=0,
        mig_enabled=False,
        seen_at=NOW,
    )
    return replace(base, **changes)


def test_the_busy_h100_capture_is_never_chosen_and_names_the_process() -> None:
    reading = parse_query_csv(
        (H100 / "nvidia-smi-query-busy.csv").read_text(),
        apps=(H100 / "nvidia-smi-compute-apps-busy.csv").read_text(),
    ).gpus[0]
    busy = state_from(reading)
    # Even a request that fits in the 59 GiB left is refused: 21 GiB are someone else's.
    selection = select_gpus([busy], Need(count=1, memory_mib=10_000), POLICY, now=NOW)
    assert selection.chosen == ()
    (refused,) = selection.rejected
    assert refused.reason == Reason.FOREIGN_PROCESS
    assert "21,453 MiB" in refused.detail
    assert "pid 435 python3" in refused.detail


def test_the_idle_h100_capture_is_chosen() -> None:
    reading = parse_any((H100 / "nvidia-smi-q-idle.xml").read_text()).gpus[0]
    selection = select_gpus([state_from(reading)], Need(1, 70_000), POLICY, now=NOW)
    assert [g.uuid for g in selection.chosen] == ["GPU-c52ba79b-f39d-a388-315d-65a6606606ea"]


def test_stale_readings_are_refused() -> None:
    old = gpu(0, seen_at=NOW - timedelta(seconds=31))
    never = gpu(1, seen_at=None)
    selection = select_gpus([old, never], Need(1, 1), POLICY, now=NOW)
    assert selection.chosen == ()
    assert selection.reasons() == {0: Reason.STALE, 1: Reason.STALE}
    assert "read 31 s ago" in selection.rejected[0].detail
    assert "never read" in selection.rejected[1].detail


def test_every_rejection_carries_its_reason() -> None:
    gpus = [
        gpu(0, present=False),
        gpu(1, seen_at=NOW - timedelta(minutes=5)),
        gpu(2),  # allocated
        gpu(3, mig_enabled=True),
        gpu(4, memory_foreign_mib=2048, foreign_processes=("pid 9 python3",)),
        gpu(5, free=1000),
        gpu(6, memory_free_mib=None),
        gpu(7, memory_foreign_mib=None),
    ]
    selection = select_gpus(gpus, Need(1, 40_000), POLICY, now=NOW, allocated={"GPU-2"})
    assert selection.chosen == ()
    assert selection.reasons() == {
        0: Reason.NOT_PRESENT,
        1: Reason.STALE,
        2: Reason.ALLOCATED,
        3: Reason.MIG,
        4: Reason.FOREIGN_PROCESS,
        5: Reason.NOT_ENOUGH_FREE_MEMORY,
        6: Reason.NOT_ENOUGH_FREE_MEMORY,
        7: Reason.FOREIGN_PROCESS,
    }
    assert all(item.detail for item in selection.rejected)
    assert "none chosen" in selection.summary


def test_offline_host_gets_no_placement() -> None:
    selection = select_gpus([gpu(0)], Need(1, 1), POLICY, now=NOW, host_online=False)
    assert selection.reasons() == {0: Reason.HOST_OFFLINE}


def test_least_loaded_first_with_index_tie_break() -> None:
    gpus = [gpu(0, free=50_000), gpu(1, free=80_000), gpu(2, free=80_000, utilization_gpu_pct=30)]
    gpus.append(gpu(3, free=80_000))
    selection = select_gpus(gpus, Need(2, 40_000), POLICY, now=NOW)
    assert [g.index for g in selection.chosen] == [1, 3]
    again = select_gpus(list(reversed(gpus)), Need(2, 40_000), POLICY, now=NOW)
    assert again.chosen == selection.chosen


def test_small_foreign_use_ranks_down_but_is_allowed() -> None:
    gpus = [gpu(0, free=79_500, memory_foreign_mib=500), gpu(1, free=80_000)]
    assert [g.index for g in select_gpus(gpus, Need(1, 1), POLICY, now=NOW).chosen] == [1]
    assert [g.index for g in select_gpus(gpus, Need(2, 1), POLICY, now=NOW).chosen] == [1, 0]


def test_chosen_gpus_are_one_model() -> None:
    gpus = [gpu(0), gpu(1, name="NVIDIA A40"), gpu(2, name="NVIDIA A40")]
    selection = select_gpus(gpus, Need(2, 1), POLICY, now=NOW)
    assert [g.index for g in selection.chosen] == [1, 2]
    too_few = select_gpus(gpus, Need(3, 1), POLICY, now=NOW)
    assert too_few.chosen == ()
    assert set(too_few.reasons().values()) == {Reason.TOO_FEW_OF_MODEL}


def test_fleet_packs_partly_used_hosts_first() -> None:
    full = HostGpus("a-full", tuple(replace(gpu(i), host="a-full", uuid=f"A{i}") for i in range(8)))
    partial = HostGpus(
        "b-partial", tuple(replace(gpu(i), host="b-partial", uuid=f"B{i}") for i in range(2))
    )
    offline = HostGpus("c-off", (replace(gpu(0), host="c-off", uuid="C0"),), online=False)
    result = select_on_fleet([full, partial, offline], Need(2, 1), POLICY, now=NOW)
    assert result.choice.host == "b-partial"
    assert result.per_host["c-off"].reasons() == {0: Reason.HOST_OFFLINE}
    eight = select_on_fleet([full, partial], Need(8, 1), POLICY, now=NOW)
    assert eight.choice.host == "a-full"


def test_need_is_validated() -> None:
    with pytest.raises(ValueError, match="count"):
        Need(count=0, memory_mib=1)


# --- property tests against brute force ---------------------------------------------------------

MODELS = ("NVIDIA H100 80GB HBM3", "NVIDIA A40")


@st.composite
def hosts(draw: st.DrawFn) -> list[GpuState]:
    size = draw(st.integers(min_value=0, max_value=6))
    return [
        GpuState(
            host="h",
            index=index,
            uuid=f"GPU-{index}",
            name=draw(st.sampled_from(MODELS)),
            memory_total_mib=81_559,
            memory_free_mib=draw(st.one_of(st.none(), st.integers(0, 81_559))),
            memory_foreign_mib=draw(st.one_of(st.none(), st.integers(0, 4_000))),
            utilization_gpu_pct=draw(st.one_of(st.none(), st.integers(0, 100))),
            mig_enabled=draw(st.sampled_from([None, False, True])),
            seen_at=NOW - timedelta(seconds=draw(st.integers(0, 60))),
            present=draw(st.booleans()),
        )
        for index in range(size)
    ]


def brute_force(gpus: list[GpuState], need: Need, allocated: set[str]) -> tuple[GpuState, ...]:
    usable = [g for g in gpus if rejection(g, need, POLICY, now=NOW, allocated=allocated) is None]
    best = None
    for combo in itertools.combinations(usable, need.count):
        if len({g.name for g in combo}) != 1:
            continue
        ranked = tuple(sorted(combo, key=GpuState.rank))
        key = (tuple(g.rank() for g in ranked), ranked[0].name)
        if best is None or key < best[0]:
            best = (key, ranked)
    return best[1] if best else ()


@settings(max_examples=300, deadline=None)
@given(
    gpus=hosts(),
    count=st.integers(1, 4),
    memory=st.integers(0, 81_559),
    allocated=st.sets(st.sampled_from([f"GPU-{i}" for i in range(6)])),
)
def test_selection_matches_brute_force_and_never_breaks_a_rule(
    gpus: list[GpuState], count: int, memory: int, allocated: set[str]
) -> None:
    need = Need(count, memory)
    selection = select_gpus(gpus, need, POLICY, now=NOW, allocated=allocated)
    assert selection.chosen == brute_force(gpus, need, allocated)
    chosen = {g.uuid for g in selection.chosen}
    assert all(g in gpus for g in selection.chosen)  # only GPUs it was given
    assert len({g.name for g in selection.chosen}) <= 1
    for g in selection.chosen:
        assert g.uuid not in allocated
        assert not g.mig_enabled
        assert g.present
        assert g.memory_free_mib >= memory
        assert g.memory_foreign_mib <= POLICY.foreign_threshold_mib
        assert NOW - g.seen_at <= POLICY.max_age
    rejected = {item.gpu.uuid for item in selection.rejected}
    assert not chosen & rejected
    if not selection.chosen:
        assert rejected == {g.uuid for g in gpus}  # a reason for every GPU
