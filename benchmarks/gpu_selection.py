"""GPU selection speed on a 1,000-GPU fleet, and its correctness against brute force.

Pure Python, no database (selection is a pure function; ``gpus.inventory.fleet()`` reads its
input in two queries)::

    .venv/bin/python benchmarks/gpu_selection.py

125 hosts x 8 GPUs with a seeded random mix of models, foreign processes, allocations, MIG and
stale readings; thousands of random requests (1, 2, 4 or 8 GPUs, 1-80 GiB each). Each decision
is one ``select_on_fleet`` call over the whole fleet (5 runs x 1,000 requests). Prints a table
(median and spread of the runs' p50/p95) and one JSON line. Before timing, it checks the
greedy choice against brute force on thousands of small random fleets and stops on the first
difference.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from gpus.selection import (
    GpuState,
    HostGpus,
    Need,
    Policy,
    rejection,
    select_gpus,
    select_on_fleet,
)

RUNS = 5
HOSTS = 125
GPUS_PER_HOST = 8
REQUESTS = 1_000
BRUTE_FORCE_CASES = 3_000
SEED = 20261127
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
POLICY = Policy(max_age=timedelta(seconds=30), foreign_threshold_mib=1024)
MODELS = {
    "NVIDIA H100 80GB HBM3": 81_559,
    "NVIDIA A100-SXM4-40GB": 40_960,
    "NVIDIA L40S": 46_068,
}


def random_gpu(rng: random.Random, host: str, index: int, model: str) -> GpuState:
    total = MODELS[model]
    foreign = rng.choice([0, 0, 0, 0, 300, 2_048, 21_453])
    used = foreign + rng.choice([0, 0, 0, 20_000, 35_000])
    return GpuState(
        host=host,
        index=index,
        uuid=f"GPU-{host}-{index}",
        name=model,
        memory_total_mib=total,
        memory_free_mib=max(total - used - 480, 0),
        memory_foreign_mib=foreign,
        utilization_gpu_pct=rng.randint(0, 100),
        mig_enabled=rng.random() < 0.02,
        seen_at=NOW - timedelta(seconds=rng.choice([1, 5, 10, 10, 15, 120])),
    )


def random_fleet(rng: random.Random, hosts: int, gpus: int) -> tuple[list[HostGpus], set[str]]:
    fleet = []
    allocated: set[str] = set()
    for number in range(hosts):
        name = f"gpu-{number:03}"
        model = rng.choice(list(MODELS))
        states = tuple(random_gpu(rng, name, index, model) for index in range(gpus))
        allocated.update(g.uuid for g in states if rng.random() < 0.25)
        fleet.append(HostGpus(name, states, online=rng.random() > 0.03))
    return fleet, allocated


def random_need(rng: random.Random) -> Need:
    return Need(count=rng.choice([1, 1, 2, 4, 8]), memory_mib=rng.randint(1, 80) * 1024)


# --- brute force ---------------------------------------------------------------------------------


def brute_force_host(host: HostGpus, need: Need, allocated: set[str]) -> tuple | None:
    usable = [
        g
        for g in host.gpus
        if rejection(g, need, POLICY, now=NOW, allocated=allocated, host_online=host.online) is None
    ]
    best = None
    for combo in itertools.combinations(usable, need.count):
        if len({g.name for g in combo}) != 1:
            continue
        ranked = tuple(sorted(combo, key=GpuState.rank))
        key = (tuple(g.rank() for g in ranked), ranked[0].name)
        if best is None or key < best[0]:
            spare = sum(1 for g in usable if g.name == ranked[0].name) - need.count
            best = (key, ranked, spare)
    return best


def brute_force_fleet(fleet: list[HostGpus], need: Need, allocated: set[str]) -> tuple:
    best = None
    for host in fleet:
        found = brute_force_host(host, need, allocated)
        if found is None:
            continue
        key = (found[2], found[0][0], host.name)
        if best is None or key < best[0]:
            best = (key, found[1])
    return best[1] if best else ()


def check_against_brute_force(rng: random.Random) -> int:
    for case in range(BRUTE_FORCE_CASES):
        fleet, allocated = random_fleet(rng, rng.randint(1, 4), rng.randint(0, 6))
        need = Need(count=rng.randint(1, 4), memory_mib=rng.randint(0, 80) * 1024)
        fast = select_on_fleet(fleet, need, POLICY, now=NOW, allocated=allocated)
        chosen = fast.choice.chosen if fast.choice else ()
        expected = brute_force_fleet(fleet, need, allocated)
        if chosen != expected:
            raise SystemExit(f"case {case}: greedy chose {chosen}, brute force {expected}")
        for host in fleet:  # and per host, every GPU not chosen by a failed selection has a reason
            selection = fast.per_host[host.name]
            rejected = {r.gpu.uuid for r in selection.rejected}
            if not selection.ok and rejected != {g.uuid for g in host.gpus}:
                raise SystemExit(f"case {case}: a GPU on {host.name} was refused without a reason")
    return BRUTE_FORCE_CASES


# --- timing --------------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


def one_run(seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    fleet, allocated = random_fleet(rng, HOSTS, GPUS_PER_HOST)
    needs = [random_need(rng) for _ in range(REQUESTS)]
    durations = []
    placed = 0
    for need in needs:
        started = time.perf_counter_ns()
        result = select_on_fleet(fleet, need, POLICY, now=NOW, allocated=allocated)
        durations.append((time.perf_counter_ns() - started) / 1e6)
        placed += result.choice is not None
    single = fleet[0]
    host_durations = []
    for need in needs[:500]:
        started = time.perf_counter_ns()
        select_gpus(single.gpus, need, POLICY, now=NOW, allocated=allocated)
        host_durations.append((time.perf_counter_ns() - started) / 1e3)
    return {
        "fleet_p50_ms": percentile(durations, 0.50),
        "fleet_p95_ms": percentile(durations, 0.95),
        "host_p50_us": percentile(host_durations, 0.50),
        "host_p95_us": percentile(host_durations, 0.95),
        "placed_fraction": placed / len(needs),
    }


def main() -> None:
    checked = check_against_brute_force(random.Random(SEED))
    runs = [one_run(SEED + run) for run in range(RUNS)]
    summary = {}
    print(f"GPU selection: {HOSTS} hosts x {GPUS_PER_HOST} GPUs, {REQUESTS} requests per run")
    print(f"greedy == brute force on {checked} small random fleets")
    print(f"{'metric':<18}{'median':>12}{'min':>12}{'max':>12}")
    for metric in runs[0]:
        values = [run[metric] for run in runs]
        median = statistics.median(values)
        summary[metric] = round(median, 4)
        print(f"{metric:<18}{median:>12.4f}{min(values):>12.4f}{max(values):>12.4f}")
    print(
        json.dumps(
            {
                "benchmark": "gpu_selection",
                "hosts": HOSTS,
                "gpus_per_host": GPUS_PER_HOST,
                "requests_per_run": REQUESTS,
                "runs": RUNS,
                "brute_force_cases": checked,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                **summary,
            }
        )
    )


if __name__ == "__main__":
    main()
