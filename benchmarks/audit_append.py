"""Audit trail throughput: serialized, hash-chained appends and full-chain verification.

Runs on a throw-away test database (SQLite of its own by default, or ``--database postgres``
for ``$BENCH_POSTGRES_URL``), so it never touches real data::

    .venv/bin/python benchmarks/audit_append.py [--database postgres] [--quick]

Prints a table (median and spread of several runs) and one JSON line.
"""

from __future__ import annotations

import argparse
import os
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

RUNS = 5
SERIAL_EVENTS = 500
THREADS = 4
EVENTS_PER_THREAD = 125
VERIFY_EVENTS = 10_000


def serial_appends() -> float:
    import audit
    from audit.actions import Action

    started = time.perf_counter()
    for index in range(SERIAL_EVENTS):
        audit.record(Action.GC_RAN, index=index, bytes_reclaimed=index * 4096)
    return SERIAL_EVENTS / (time.perf_counter() - started)


def concurrent_appends() -> float:
    import audit
    from audit.actions import Action

    barrier = threading.Barrier(THREADS)

    def writer() -> None:
        barrier.wait()
        for index in range(EVENTS_PER_THREAD):
            audit.record(Action.GC_RAN, index=index)
        connections.close_all()

    from django.db import connections

    threads = [threading.Thread(target=writer) for _ in range(THREADS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return THREADS * EVENTS_PER_THREAD / (time.perf_counter() - started)


def verification() -> float:
    from audit.verification import verify_stored_chain

    started = time.perf_counter()
    result = verify_stored_chain()
    elapsed = time.perf_counter() - started
    if not result.ok:
        raise SystemExit(f"chain broken during the benchmark: {result.reason}")
    return result.checked / elapsed


def fill_to(total: int) -> None:
    import audit
    from audit.actions import Action
    from audit.models import AuditEvent

    missing = total - AuditEvent.objects.count()
    for index in range(max(missing, 0)):
        audit.record(Action.GC_RAN, index=index)


def measure(name: str, values: list[float], unit: str) -> dict:
    stats = summary(values, digits=1)
    return {"name": name, "median": stats["median"], "unit": unit, **stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", default="sqlite", help="sqlite, postgres or a URL")
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--verify-events", type=int, default=VERIFY_EVENTS)
    parser.add_argument("--quick", action="store_true", help="3 runs, 5,000 events verified")
    args = parser.parse_args()
    runs = min(args.runs, 3) if args.quick else args.runs
    verify_events = min(args.verify_events, 5_000) if args.quick else args.verify_events
    setup_django(database_url_for(args.database))
    with throwaway_database() as vendor:
        print(f"database: {vendor}; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}")
        results = [
            measure("serial record()", [serial_appends() for _ in range(runs)], "events/s"),
            measure(
                f"{THREADS} threads record()",
                [concurrent_appends() for _ in range(runs)],
                "events/s",
            ),
        ]
        fill_to(verify_events)
        results.append(
            measure(
                f"verify ({verify_events:,}+ events)",
                [verification() for _ in range(runs)],
                "events/s",
            )
        )
    print_table(
        [(r["name"], r["median"], r["unit"], f"{r['spread_pct']}%", r["n"]) for r in results],
        ("measure", "median", "unit", "spread", "runs"),
    )
    emit_json(
        "audit_append",
        {
            "database": vendor,
            "results": results,
            "targets": [target(r["name"] + " /s", r["median"], "record", None) for r in results],
        },
    )


if __name__ == "__main__":
    main()
