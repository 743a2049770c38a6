"""Allocation race: many launches at once for fewer free GPUs must never double-book one.

Each round, ``--threads`` deployments (one GPU each) race for ``--free`` free GPUs of one host
through the real reserve path, ``deployments.runtime.allocation.reserve`` (row locks on PostgreSQL,
IMMEDIATE transactions on SQLite, and the partial unique constraint on both). A thread that
loses a GPU tries the next one in its own shuffled order, as a retried launch would, until it
holds one or every GPU is taken. After each round the allocation table is checked: no GPU may
have two active allocations (double bookings, must be 0) and exactly ``--free`` threads must
hold a GPU. Times each successful ``reserve`` call (p50/p95) and counts the losers by what
stopped them: the check under the lock, or the database constraint. On a throw-away copy of
the chosen database::

    .venv/bin/python benchmarks/allocation_race.py                      # SQLite
    .venv/bin/python benchmarks/allocation_race.py --database postgres  # $BENCH_POSTGRES_URL
    .venv/bin/python benchmarks/allocation_race.py --rounds 200 --threads 50 --free 8

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    database_url_for,
    emit_json,
    print_table,
    setup_django,
    summary,
    target,
    throwaway_database,
)

SEED = 20261127


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", default="sqlite", help="sqlite, postgres or a URL")
    parser.add_argument("--threads", type=int, default=16, help="concurrent launches per round")
    parser.add_argument("--free", type=int, default=4, help="free GPUs per round")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="10 rounds")
    args = parser.parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 10)
    if not 0 < args.free < args.threads:
        parser.error("--free must be at least 1 and fewer than --threads (it is a race)")
    return args


def build(threads: int, free: int) -> tuple[list, list]:
    """A host with ``free`` GPUs and ``threads`` queued one-GPU deployments of one team."""
    from accounts.models import Team
    from tests.deployment_builders import deployment, host_with_gpus, registered_model

    team = Team.objects.create(slug="race", name="Race")
    model = registered_model(team, Path("/nonexistent"), "tiny")
    host = host_with_gpus("race-01", count=free)
    deployments = [deployment(team, model, host, name=f"d{n}") for n in range(threads)]
    return deployments, list(host.gpus.order_by("index"))


def racer(deployment, gpus: list, barrier: threading.Barrier, seed: int, out: dict) -> None:
    from django.db import connection

    from deployments.runtime.allocation import AllocationConflict, reserve

    order = list(gpus)
    random.Random(seed).shuffle(order)
    try:
        barrier.wait()
        for gpu in order:
            started = time.perf_counter()
            try:
                reserve(deployment, [gpu])
            except AllocationConflict as exc:
                key = "constraint" if "same moment" in str(exc) else "check"
                out[key] = out.get(key, 0) + 1
                continue
            out["won"] = gpu.pk
            out["ms"] = (time.perf_counter() - started) * 1000
            return
    finally:
        connection.close()


def one_round(deployments: list, gpus: list, seed: int) -> dict:
    """Race once; returns winners, loss reasons and reserve times, then frees every GPU."""
    from django.db.models import Count

    from deployments.models import GpuAllocation

    barrier = threading.Barrier(len(deployments))
    results = [{} for _ in deployments]
    threads = [
        threading.Thread(target=racer, args=(d, gpus, barrier, seed * 1000 + n, results[n]))
        for n, d in enumerate(deployments)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    active = GpuAllocation.objects.filter(active=True)
    doubled = active.values("gpu").annotate(n=Count("id")).filter(n__gt=1).count()
    held = active.count()
    GpuAllocation.objects.filter(active=True).update(active=False)
    return {
        "winners": sum("won" in r for r in results),
        "held": held,
        "double_bookings": doubled,
        "lost_at_check": sum(r.get("check", 0) for r in results),
        "lost_at_constraint": sum(r.get("constraint", 0) for r in results),
        "reserve_ms": [r["ms"] for r in results if "ms" in r],
    }


def main() -> None:
    args = parse_args()
    setup_django(database_url_for(args.database))
    with throwaway_database() as vendor:
        deployments, gpus = build(args.threads, args.free)
        started = time.perf_counter()
        rounds = [one_round(deployments, gpus, SEED + n) for n in range(args.rounds)]
        elapsed = time.perf_counter() - started
    reserve_ms = [ms for r in rounds for ms in r["reserve_ms"]]
    doubled = sum(r["double_bookings"] for r in rounds)
    short = sum(r["winners"] != args.free or r["held"] != args.free for r in rounds)
    stats = summary(reserve_ms)
    lost_check = sum(r["lost_at_check"] for r in rounds)
    lost_constraint = sum(r["lost_at_constraint"] for r in rounds)
    print(
        f"database: {vendor}; {args.rounds} rounds of {args.threads} launches "
        f"for {args.free} free GPUs ({elapsed:.1f} s)"
    )
    print_table(
        [
            ("double bookings (must be 0)", doubled),
            (f"rounds without exactly {args.free} winners (must be 0)", short),
            ("losses stopped by the check under the lock", lost_check),
            ("losses stopped by the unique constraint", lost_constraint),
            ("reserve() p50 ms", stats["p50"]),
            ("reserve() p95 ms", stats["p95"]),
            ("reserve() max ms", stats["max"]),
        ],
        ("measure", "value"),
    )
    emit_json(
        "allocation_race",
        {
            "database": vendor,
            "rounds": args.rounds,
            "threads": args.threads,
            "free_gpus": args.free,
            "double_bookings": doubled,
            "rounds_with_wrong_winner_count": short,
            "lost_at_check": lost_check,
            "lost_at_constraint": lost_constraint,
            "reserve_ms": stats,
            "seconds": round(elapsed, 2),
            "ok": doubled == 0 and short == 0,
            "targets": [
                target(f"double bookings ({vendor})", doubled, "0", doubled == 0),
                target(f"rounds with != {args.free} winners ({vendor})", short, "0", short == 0),
                target(f"reserve() p95 ms ({vendor})", stats["p95"], "record", None),
            ],
        },
    )
    if doubled or short:
        raise SystemExit("double booking or wrong number of winners: see the table above")


if __name__ == "__main__":
    main()
