"""Shared helpers for the scripts in ``benchmarks/``: statistics, output, machine, database.

Every benchmark script prints a human table and then, as its LAST line, one JSON object
(``emit_json``); ``benchmarks/run.py`` keeps that line. Usage::

    from benchmarks._common import setup_django, summary, print_table, emit_json, throwaway_database

    setup_django()                       # before importing models; honours DATABASE_URL
    with throwaway_database() as vendor:  # a fresh test database, dropped afterwards
        durations_ms = [...]
        stats = summary(durations_ms)     # {"n", "median", "p50", "p95", "p99", "min", "max", ...}
        print_table([("reserve", stats["p50"], stats["p95"])], ("what", "p50 ms", "p95 ms"))
        emit_json("allocation_race", {"database": vendor, "reserve_ms": stats,
                  "targets": [target("reserve p95", stats["p95"], "<= 50 ms", stats["p95"] <= 50)]})

A payload's optional ``targets`` list (built with ``target()``) is what ``run.py``'s final
summary shows as pass/fail; a script without it is shown as "ran" / "failed".

The scripts run from a checkout (``python benchmarks/x.py``), so importing this module puts the
repository root on ``sys.path``.

Databases: ``setup_django()`` uses ``database_url`` if given, else ``$DATABASE_URL``, else a
SQLite file of its own under ``var/bench/`` (named after the script and the process id, so a
benchmark never clobbers a test run's ``var/berth-test.sqlite3``). ``postgres_url()`` is the
PostgreSQL server benchmarks use (``$BENCH_POSTGRES_URL``, default ``postgres://postgres@
127.0.0.1:5432/berth_bench``); ``throwaway_database()`` creates Django's ``test_<name>`` copy of
it and drops it afterwards, so the named database itself need not exist. Redis is
``redis_url()`` (``$BENCH_REDIS_URL``, default database 15 on the local server), never
``$REDIS_URL``: a benchmark may flush its Redis database.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import sqlite3
import statistics
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent
if str(BASE_DIR) not in sys.path:
    sys.path.insert(0, str(BASE_DIR))

DEFAULT_POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/berth_bench"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"


# --- statistics ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in 0..100) with linear interpolation between closest ranks
    (numpy's default); ``nan`` for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    """n, median, p50/p95/p99, min, max, and spread: (max - min) / median in percent."""
    if not values:
        return {"n": 0}
    median = statistics.median(values)
    spread = (max(values) - min(values)) / median * 100 if median else 0.0
    return {
        "n": len(values),
        "median": round(median, digits),
        "p50": round(percentile(values, 50), digits),
        "p95": round(percentile(values, 95), digits),
        "p99": round(percentile(values, 99), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "spread_pct": round(spread, 1),
    }


# --- output --------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    """A plain text table: first column left-aligned, the others right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) for v, w in zip(values, widths, strict=True)]
        return "  ".join([values[0].ljust(widths[0]), *padded[1:]])

    print(line(list(headers)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))


def emit_json(name: str, payload: dict[str, Any]) -> None:
    """Print the script's result as one JSON line (``{"benchmark": name, ...}``); must be the
    last line the script prints — ``run.py`` takes the last line that parses as JSON."""
    print(json.dumps({"benchmark": name, **payload}, default=str), flush=True)


def target(what: str, figure: Any, goal: str, ok: bool | None) -> dict[str, Any]:
    """One checked figure for the summary: ``target("p95 per decision", 3.1, "<= 50 ms", True)``.
    ``ok`` None means recorded only (no target)."""
    return {"what": what, "figure": figure, "goal": goal, "ok": ok}


# --- machine -------------------------------------------------------------------------------------


def _cpu_model() -> str:
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    with suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    return None


def _os_name() -> str:
    with suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return f"{line.split('=', 1)[1].strip(chr(34))} (kernel {platform.release()})"
    return platform.platform()


def _git_commit() -> str | None:
    """HEAD's commit read from .git (no subprocess); None outside a checkout."""
    git = BASE_DIR / ".git"
    with suppress(OSError):
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head.removeprefix("ref: ")
        loose = git / ref
        if loose.exists():
            return loose.read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    return None


def _postgres_version() -> str | None:
    with suppress(Exception):
        import psycopg

        url = postgres_url().rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(url, connect_timeout=3) as conn:
            return conn.execute("SHOW server_version").fetchone()[0]
    return None


def _redis_version() -> str | None:
    with suppress(Exception):
        import redis

        client = redis.Redis.from_url(redis_url(), socket_connect_timeout=3)
        return client.info("server")["redis_version"]
    return None


def _docker_version() -> str | None:
    with suppress(Exception):
        import docker

        client = docker.from_env(timeout=5)
        return client.version()["Version"]
    return None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, RAM, OS, versions, commit, date (UTC)."""
    import django

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "os": _os_name(),
        "python": platform.python_version(),
        "django": django.get_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgresql": _postgres_version(),
        "redis": _redis_version(),
        "docker": _docker_version(),
        "git_commit": _git_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# --- Django and databases ------------------------------------------------------------------------


def postgres_url() -> str:
    """The PostgreSQL server benchmarks use: ``$BENCH_POSTGRES_URL`` or the local default."""
    return os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)


def redis_url() -> str:
    """The Redis database benchmarks use (and may flush): ``$BENCH_REDIS_URL`` or db 15."""
    return os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL)


def database_url_for(choice: str) -> str | None:
    """``sqlite`` -> None (a private SQLite file), ``postgres`` -> ``postgres_url()``, else the
    value itself as a URL — for a ``--database`` flag."""
    if choice == "sqlite":
        return None
    if choice == "postgres":
        return postgres_url()
    return choice


def setup_django(database_url: str | None = None) -> None:
    """Configure and set up Django for a benchmark process (once, before importing models).

    The database is ``database_url``, else ``$DATABASE_URL``, else a SQLite file private to this
    process under ``var/bench/``; Redis is ``redis_url()``. Child processes inherit both
    through ``os.environ``. SIGTERM (``run.py`` stopping a script over its budget) raises
    SystemExit, so ``throwaway_database()`` and other ``finally`` blocks still clean up.
    """
    import django

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if database_url is None and "DATABASE_URL" not in os.environ:
        script = Path(sys.argv[0]).stem or "bench"
        database_url = f"sqlite:///{BASE_DIR / 'var' / 'bench' / f'{script}-{os.getpid()}.sqlite3'}"
    if database_url is not None:
        os.environ["DATABASE_URL"] = database_url
    os.environ["REDIS_URL"] = redis_url()
    os.environ.setdefault("LOG_LEVEL", "warning")  # the tables, not every request and login
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    django.setup()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def throwaway_database() -> Iterator[str]:
    """Create Django's test copy of the configured database (migrated, empty), yield the
    vendor (``sqlite`` or ``postgresql``), and drop it afterwards, also on errors."""
    from django.db import connection

    old_name = connection.settings_dict["NAME"]
    test_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        yield connection.vendor
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
        if connection.vendor == "sqlite":  # WAL sidecars a child process left behind
            for suffix in ("-wal", "-shm"):
                Path(f"{test_name}{suffix}").unlink(missing_ok=True)
