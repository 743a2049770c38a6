"""Audit trail throughput: serialized, hash-chained appends and full-chain verification.

Runs on a throw-away test database of whatever DATABASE_URL names (SQLite by default), so it
never touches real data::

    .venv/bin/python benchmarks/audit_append.py                      # SQLite under var/
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/test .venv/bin/python benchmarks/audit_append.py

Prints a table (median and spread of several runs) and one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django

django.setup()

from django.db import connection, connections  # noqa: E402

RUNS = 5
SERIAL_EVENTS = 500
THREADS = 4
EVENTS_PER_THREAD = 125
VERIFY_EVENTS = 20_000


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


def summary(name: str, values: list[float], unit: str) -> dict:
    median = statistics.median(values)
    spread = (max(values) - min(values)) / median * 100 if median else 0.0
    print(f"{name:<34} {median:>12,.0f} {unit:<10} ±{spread:4.1f}% over {len(values)} runs")
    return {
        "name": name,
        "median": round(median, 1),
        "unit": unit,
        "spread_pct": round(spread, 1),
        "runs": len(values),
    }


def main() -> None:
    old_name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        vendor = connection.vendor
        print(f"database: {vendor}; {os.cpu_count()} CPUs; Python {sys.version.split()[0]}")
        results = [
            summary("serial record()", [serial_appends() for _ in range(RUNS)], "events/s"),
            summary(
                f"{THREADS} threads record()",
                [concurrent_appends() for _ in range(RUNS)],
                "events/s",
            ),
        ]
        fill_to(VERIFY_EVENTS)
        results.append(
            summary(
                f"verify ({VERIFY_EVENTS:,}+ events)",
                [verification() for _ in range(RUNS)],
                "events/s",
            )
        )
        print(json.dumps({"benchmark": "audit_append", "database": vendor, "results": results}))
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)


if __name__ == "__main__":
    main()
