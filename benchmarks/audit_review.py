"""Audit review at a million events: latency and query count of the review page's filtered
queries, through Django's test client as an auditor, on SQLite and PostgreSQL.

::

    .venv/bin/python benchmarks/audit_review.py                      # SQLite (var/bench/)
    .venv/bin/python benchmarks/audit_review.py --database postgres  # database bench_audit
    .venv/bin/python benchmarks/audit_review.py --events 200000 --runs 10 --explain

The database is dedicated to this benchmark and kept between runs (``--reseed`` rebuilds it): a
SQLite file under ``var/bench/`` or the PostgreSQL database ``bench_audit`` (created by the
script) on the server of ``--database URL``, of ``$DATABASE_URL`` when it names PostgreSQL, or of
``$BENCH_POSTGRES_URL``. Nothing else is touched.

Seeding: the events are generated in Python and inserted in bulk — ``executemany`` on SQLite,
``COPY`` on PostgreSQL — with the secondary indexes dropped during the load and built afterwards
(what a restore does). This bypasses ``audit.record()`` (one locked transaction per event would
take hours), but NOT the chain: every row's ``prev_hash``/``hash`` is computed with
``audit.chain.event_hash`` exactly as ``record()`` does, and times increase with ``seq`` as
``record()`` guarantees, so the seeded trail verifies with ``manage.py audit_verify`` and new
events (the benchmark's own sign-in) append to it normally.

The trail: 1,000,000 events a year long (one every ~31 s) from 200 users, the system and jobs,
in 20 teams; 35 actions with realistic skew (state changes and inventory events common, admin
actions rare); 4% failed or denied; requests of 1-6 events, jobs of 2-8.

Each case is one GET of ``/audit/?...`` (warmed up, then ``--runs`` times): p50/p95/max in ms,
the rows on the page, and the number of SQL queries the request made. Target: every filtered
page under 300 ms at 1,000,000 events, and a query count that does not grow with page size.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    BASE_DIR,
    emit_json,
    machine_info,
    postgres_url,
    print_table,
    setup_django,
    summary,
    target,
)

PG_DATABASE = "bench_audit"
SQLITE_PATH = BASE_DIR / "var" / "bench" / "audit_review.sqlite3"
START = datetime(2025, 11, 1, tzinfo=UTC)
SPAN = timedelta(days=365)
USERS = [f"user{index:03d}" for index in range(200)]
TEAMS = [f"team-{index:02d}" for index in range(20)]
# (action, weight): inventory and state changes dominate, admin actions are rare.
ACTIONS = [
    ("deployment.state_changed", 300),
    ("gpu.reserved", 80),
    ("gpu.released", 80),
    ("gc.ran", 40),
    ("reconcile.ran", 120),
    ("auth.login", 60),
    ("auth.logout", 40),
    ("auth.login_failed", 10),
    ("deployment.launch_requested", 60),
    ("deployment.stop_requested", 40),
    ("deployment.restart_requested", 10),
    ("deployment.delete_requested", 10),
    ("deployment.deleted", 10),
    ("models.synced", 40),
    ("models.sync_requested", 5),
    ("model.inspected", 20),
    ("model.registered", 5),
    ("model.missing", 2),
    ("host.inventory_unavailable", 3),
    ("host.inventory_restored", 3),
    ("gpu.appeared", 2),
    ("gpu.disappeared", 1),
    ("audit.verify_requested", 1),
    ("audit.verified", 1),
    ("team.member_added", 1),
    ("account.role_changed", 1),
    ("model.remote_code_approved", 1),
]
COLUMNS = (
    "seq",
    "time",
    "actor_id",
    "actor_name",
    "actor_kind",
    "team_id",
    "team_slug",
    "action",
    "target_type",
    "target_id",
    "target_repr",
    "request_id",
    "job_id",
    "client_ip",
    "outcome",
    "payload_json",
    "prev_hash",
    "hash",
)


# --- the dedicated database ----------------------------------------------------------------------


def database_url(choice: str) -> str:
    if choice == "sqlite":
        SQLITE_PATH.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{SQLITE_PATH}"
    server = postgres_url() if choice == "postgres" else choice
    return server.rsplit("/", 1)[0] + f"/{PG_DATABASE}"


def create_postgres_database(url: str, *, drop: bool) -> None:
    import psycopg

    maintenance = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(maintenance, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [PG_DATABASE]
        ).fetchone()
        if exists and drop:
            conn.execute(f"DROP DATABASE {PG_DATABASE} WITH (FORCE)")
            exists = None
        if not exists:
            conn.execute(f"CREATE DATABASE {PG_DATABASE}")


# --- seeding -------------------------------------------------------------------------------------


def generate(total: int, seed: int = 7) -> Any:
    """Yield ``total`` chained rows (tuples in COLUMNS order), oldest first."""
    from audit import chain

    rng = random.Random(seed)
    names = [name for name, _ in ACTIONS]
    weights = [weight for _, weight in ACTIONS]
    step = SPAN / total
    prev_hash = chain.GENESIS_HASH
    request_id, request_left, job_id, job_left = "", 0, "", 0
    actions = rng.choices(names, weights, k=total)
    for index in range(total):
        seq = index + 1
        moment = START + step * index
        if request_left == 0 and rng.random() < 0.5:
            request_id, request_left = uuid.UUID(int=rng.getrandbits(128)).hex, rng.randint(1, 6)
        if job_left == 0 and rng.random() < 0.2:
            job_id, job_left = uuid.UUID(int=rng.getrandbits(128)).hex, rng.randint(2, 8)
        in_request, in_job = request_left > 0, job_left > 0 and request_left == 0
        request_left, job_left = max(request_left - 1, 0), max(job_left - (1 if in_job else 0), 0)
        roll = rng.random()
        if in_request or roll < 0.55:
            actor_name, actor_kind = rng.choice(USERS), "user"
        elif in_job:
            actor_name, actor_kind = rng.choice(USERS), "job"
        else:
            actor_name, actor_kind = "system", "system"
        team_slug = rng.choice(TEAMS) if rng.random() < 0.8 else ""
        outcome = "ok" if rng.random() >= 0.04 else rng.choice(("failed", "denied"))
        deployment = rng.randint(1, 5000)
        fields = {
            "seq": seq,
            "time": moment,
            "actor_name": actor_name,
            "actor_kind": actor_kind,
            "team_slug": team_slug,
            "action": actions[index],
            "target_type": "deployments.deployment",
            "target_id": str(deployment),
            "target_repr": f"llama-{deployment}",
            "request_id": request_id if in_request else "",
            "job_id": job_id if in_job else "",
            "client_ip": f"10.0.0.{rng.randint(1, 254)}" if in_request else "",
            "outcome": outcome,
            "payload_json": chain.canonical_json({"step": index % 97, "gpus": [index % 8]}),
        }
        digest = chain.event_hash(prev_hash, fields)
        yield (
            seq,
            moment,
            None,
            actor_name,
            actor_kind,
            None,
            team_slug,
            fields["action"],
            fields["target_type"],
            fields["target_id"],
            fields["target_repr"],
            fields["request_id"],
            fields["job_id"],
            fields["client_ip"],
            outcome,
            fields["payload_json"],
            prev_hash,
            digest,
        )
        prev_hash = digest


def _secondary_indexes(connection: Any) -> list[tuple[str, str]]:
    """(name, CREATE statement) of the audit table's indexes that are not constraints."""
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                "AND tbl_name = 'audit_auditevent' AND sql IS NOT NULL"
            )
        else:
            cursor.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'audit_auditevent' "
                "AND indexname NOT IN (SELECT conname FROM pg_constraint)"
            )
        return list(cursor.fetchall())


def seed(total: int) -> dict[str, float]:
    """Load ``total`` events into the (empty) audit table; returns timings in seconds."""
    from django.db import connection, transaction

    started = time.perf_counter()
    indexes = _secondary_indexes(connection)
    with connection.cursor() as cursor:
        for name, _ in indexes:
            cursor.execute(f'DROP INDEX "{name}"')
    rows = generate(total)
    batch: list[tuple] = []
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            placeholders = ", ".join("?" for _ in COLUMNS)
            sql = f"INSERT INTO audit_auditevent ({', '.join(COLUMNS)}) VALUES ({placeholders})"  # noqa: S608
            raw = cursor.cursor  # the sqlite3 cursor itself: no per-row Django wrapping
            adapt = connection.ops.adapt_datetimefield_value
            for row in rows:
                batch.append((*row[:1], adapt(row[1]), *row[2:]))
                if len(batch) == 20_000:
                    raw.executemany(sql, batch)
                    batch.clear()
            if batch:
                raw.executemany(sql, batch)
        else:
            with cursor.cursor.copy(
                f"COPY audit_auditevent ({', '.join(COLUMNS)}) FROM STDIN"
            ) as copy:
                for row in rows:
                    copy.write_row(row)
    loaded = time.perf_counter()
    with connection.cursor() as cursor:
        for _name, create in indexes:
            cursor.execute(create)
        if connection.vendor == "postgresql":
            cursor.execute("ANALYZE audit_auditevent")
    return {"load_s": loaded - started, "index_s": time.perf_counter() - loaded}


# --- measuring -----------------------------------------------------------------------------------


def cases(total: int) -> list[tuple[str, dict[str, Any]]]:
    from audit.models import AuditEvent

    middle = START + SPAN / 2
    request_id = (
        AuditEvent.objects.filter(seq__gte=total // 2, seq__lt=total // 2 + 1000)
        .exclude(request_id="")
        .values_list("request_id", flat=True)
        .first()
    )
    day = {
        "since": middle.strftime("%Y-%m-%dT%H:%M"),
        "until": (middle + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M"),
    }
    week = {"since": middle.isoformat(), "until": (middle + timedelta(days=7)).isoformat()}
    return [
        ("no filter, first page", {}),
        ("no filter, 200 rows", {"size": 200}),
        ("action (common)", {"action": "deployment.state_changed"}),
        ("action (rare)", {"action": "model.remote_code_approved"}),
        ("actor", {"actor": "user042"}),
        ("actor kind", {"kind": "system"}),
        ("team", {"team": "team-07"}),
        ("outcome failed", {"outcome": "failed"}),
        ("target", {"target_type": "deployments.deployment", "target_id": "1234"}),
        ("request id", {"request": request_id}),
        ("time range: 1 day (datetime-local)", day),
        ("time range: 1 week + action", {**week, "action": "gc.ran"}),
        ("time range: 1 week + actor", {**week, "actor": "user042"}),
        ("action + team + outcome", {"action": "gpu.reserved", "team": "team-03", "outcome": "ok"}),
        ("deep page: before=seq/2", {"before": total // 2}),
        ("deep page: action, before=seq/5", {"action": "gc.ran", "before": total // 5}),
        ("deep page: team, before=seq/10", {"team": "team-07", "before": total // 10}),
    ]


def measure(client: Any, path: str, query: dict[str, Any], runs: int) -> dict[str, Any]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    for _ in range(2):
        response = client.get(path, query)
        if response.status_code != 200:
            raise SystemExit(f"{path} {query}: HTTP {response.status_code}")
    with CaptureQueriesContext(connection) as captured:
        response = client.get(path, query)
    queries = len(captured)  # now: the next request clears the log it reads from
    rows = response.content.decode().count('<td><a href="/audit/events/')
    durations = []
    for _ in range(runs):
        started = time.perf_counter()
        client.get(path, query)
        durations.append((time.perf_counter() - started) * 1000)
    return {"ms": summary(durations), "rows": rows, "queries": queries}


def measure_export(client: Any, path: str, query: dict[str, Any], runs: int) -> dict[str, Any]:
    """Stream a whole export: wall time, rows per second, and (in one more run, under
    tracemalloc) the peak memory the process allocated while streaming it."""
    import tracemalloc

    durations, rows = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        response = client.get(path, query)
        rows = sum(chunk.count(b"\n") for chunk in response.streaming_content)
        durations.append((time.perf_counter() - started) * 1000)
    tracemalloc.start()
    response = client.get(path, query)
    for _chunk in response.streaming_content:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    stats = summary(durations)
    return {
        "ms": stats,
        "lines": rows,
        "rows_per_s": round(rows / (stats["p50"] / 1000)),
        "peak_mib": round(peak / 2**20, 1),
    }


def explain(query: dict[str, Any]) -> str:
    from django.db import connection

    from audit import filters

    form = filters.parse({key: str(value) for key, value in query.items()})
    if not form.is_valid():
        raise SystemExit(f"{query}: {form.errors}")
    events = form.events()
    if form.before_seq:
        events = events.filter(seq__lt=form.before_seq)
    sql, params = events[: form.page_size + 1].query.sql_with_params()
    prefix = "EXPLAIN QUERY PLAN " if connection.vendor == "sqlite" else "EXPLAIN "
    with connection.cursor() as cursor:
        cursor.execute(prefix + sql, params)
        return " | ".join(str(row[-1]) for row in cursor.fetchall())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    from_env = os.environ.get("DATABASE_URL", "")
    parser.add_argument(
        "--database",
        default=from_env if from_env.startswith("postgres") else "sqlite",
        help="sqlite, postgres or a PostgreSQL URL (its server gets the database bench_audit); "
        "default: DATABASE_URL's server if it is PostgreSQL, else SQLite",
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--reseed", action="store_true", help="rebuild the benchmark database")
    parser.add_argument("--explain", action="store_true", help="print each case's query plan")
    args = parser.parse_args()

    url = database_url(args.database)
    if args.database == "sqlite":
        if args.reseed:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{SQLITE_PATH}{suffix}").unlink(missing_ok=True)
    else:
        create_postgres_database(url, drop=args.reseed)
    setup_django(url)

    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.test.utils import setup_test_environment

    from accounts.models import Role, User
    from audit.models import AuditEvent

    setup_test_environment()
    call_command("migrate", verbosity=0)
    vendor = connection.vendor
    existing = AuditEvent.objects.count()
    seeding: dict[str, float] = {}
    if existing < args.events:
        if existing:
            raise SystemExit(
                f"the benchmark database holds {existing:,} events, fewer than --events "
                f"{args.events:,}: run again with --reseed"
            )
        print(f"seeding {args.events:,} events into {vendor} ...", flush=True)
        seeding = seed(args.events)
        print(
            f"seeded in {seeding['load_s']:.1f} s + indexes {seeding['index_s']:.1f} s",
            flush=True,
        )
    total = AuditEvent.objects.count()
    auditor = User.objects.filter(username="bench-auditor").first() or User.objects.create_user(
        "bench-auditor", role=Role.AUDITOR
    )
    client = Client()
    client.force_login(auditor)

    results = []
    for name, query in cases(args.events):
        result = measure(client, "/audit/", query, args.runs)
        results.append({"case": name, "query": query, **result})
        if args.explain:
            print(f"  {name}: {explain(query)}")
    middle = START + SPAN / 2
    exports = [
        (
            "CSV, 1 day",
            "/audit/export.csv",
            {"since": middle.isoformat(), "until": (middle + timedelta(days=1)).isoformat()},
        ),
        ("JSON Lines, one team", "/audit/export.jsonl", {"team": "team-07"}),
    ]
    export_results = []
    for name, path, query in exports:
        export_results.append({"case": name, **measure_export(client, path, query, 3)})
    detail_seq = args.events // 2
    detail = measure(client, f"/audit/events/{detail_seq}/", {}, args.runs)
    results.append({"case": "event detail (+ its request, job)", "query": {}, **detail})

    print(f"\naudit review, {vendor}, {total:,} events, {args.runs} runs per case")
    print_table(
        [
            (r["case"], r["rows"], r["queries"], r["ms"]["p50"], r["ms"]["p95"], r["ms"]["max"])
            for r in results
        ],
        ("case", "rows", "queries", "p50 ms", "p95 ms", "max ms"),
    )
    print()
    print_table(
        [
            (f"export {r['case']}", r["lines"], r["ms"]["p50"], r["rows_per_s"], r["peak_mib"])
            for r in export_results
        ],
        ("streamed export", "lines", "p50 ms", "rows/s", "peak MiB"),
    )
    worst = max(r["ms"]["p95"] for r in results)
    print(f"worst p95: {worst:.1f} ms (target < 300 ms)")
    emit_json(
        "audit_review",
        {
            "database": vendor,
            "events": total,
            "runs": args.runs,
            "seeding_s": {k: round(v, 1) for k, v in seeding.items()},
            "worst_p95_ms": worst,
            "results": results,
            "exports": export_results,
            "machine": machine_info(),
            "targets": _targets(results, export_results, total),
        },
    )


def _targets(results: list[dict], exports: list[dict], total: int) -> list[dict]:
    """Under 300 ms at a million events; query count independent of page size; exports
    streamed (memory flat whatever the number of rows)."""
    by_case = {r["case"]: r for r in results}
    worst = max(r["ms"]["p95"] for r in results)
    queries = max(r["queries"] for r in results)
    small, large = by_case["no filter, first page"], by_case["no filter, 200 rows"]
    peak = max(r["peak_mib"] for r in exports)
    return [
        target(f"worst filtered page p95 ms ({total:,} events)", worst, "< 300", worst < 300),
        target("SQL queries per page (max)", queries, "<= 6", queries <= 6),
        target(
            "queries, 200-row page vs 50-row page",
            f"{large['queries']} vs {small['queries']}",
            "equal",
            large["queries"] == small["queries"],
        ),
        target("export peak memory MiB", peak, "< 50", peak < 50),
    ]


if __name__ == "__main__":
    main()
