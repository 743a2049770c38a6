"""Pages at scale: the console's list and history pages on a seeded fleet, served by a real
uvicorn process, timed over HTTP while a second process hammers another page, with the SQL
queries each page runs, against the Django admin changelist of the same table (the ratio).

::

    .venv/bin/python benchmarks/pages_at_scale.py                       # SQLite, full size
    .venv/bin/python benchmarks/pages_at_scale.py --database postgres
    .venv/bin/python benchmarks/pages_at_scale.py --quick               # 2 h of history

Seeds a throw-away database (Django's test copy of a private SQLite file under ``var/bench/``,
or of ``$BENCH_POSTGRES_URL``): 10 hosts x 8 GPUs = 80 GPUs (the dashboard case asks for 64;
these pages show all 80), 10 teams, 500 deployments in mixed states with their allocations and
events, and one day of 5-second snapshots for every GPU: 80 x 17,280 = 1,382,400
``GpuSnapshot`` rows (COPY on PostgreSQL, executemany on SQLite). Retention: raw snapshots are
kept ``BERTH_GPU_RAW_RETENTION_H`` (48 h by default) before the agent rolls them up, so a day
of history is still all raw rows; the script runs the real ``compact_history`` to show it
leaves every row, and measures that state, the worst case for the history page.

Pages (signed in as an admin, who sees every team's deployments): the dashboard ``/``, the
deployments list, the GPU index, one GPU's history (default 6 h window and 24 h), and the
Django admin changelists of ``Deployment``, ``Gpu`` and ``GpuSnapshot`` (the last registered
on a separate admin site in the server process only: the app does not list snapshots in the
admin). The load process GETs a host's page in a loop. Targets (B10 in benchmarks/README.md):
p95 <= 300 ms and <= 10 SQL queries per page.

Audit review at 1,000,000 events is measured by ``benchmarks/audit_review.py``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    database_url_for,
    emit_json,
    postgres_url,
    print_table,
    redis_url,
    setup_django,
    summary,
    target,
    throwaway_database,
)

HOSTS = 10
GPUS_PER_HOST = 8
TEAMS = 10
DEPLOYMENTS = 500
SNAPSHOT_INTERVAL_S = 5
P95_TARGET_MS = 300  # B10 in benchmarks/README.md
QUERY_TARGET = 10  # ditto: <= 10 SQL queries per page
SERVER_START_S = 60
LOG = Path(__file__).resolve().parent.parent / "var" / "bench" / f"pages_at_scale-{os.getpid()}.log"
SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"  # how Django stores a UTC datetime in SQLite
LOAD_PAGE = "/gpus/hosts/gpu-02/"
SNAPSHOT_COLUMNS = (
    "gpu_id", "time", "resolution", "source", "memory_used_mib", "memory_total_mib",
    "memory_foreign_mib", "utilization_gpu_pct", "temperature_c", "power_w", "processes",
    "samples",
)  # fmt: skip
# (label, path, the admin changelist of the same table)
PAGES = (
    ("dashboard /", "/", None),
    ("deployments list", "/deployments/", "admin Deployment changelist"),
    ("GPU index", "/gpus/", "admin Gpu changelist"),
    ("GPU history 6 h", "/gpus/hosts/gpu-01/0/", "admin GpuSnapshot changelist"),
    ("GPU history 24 h", "/gpus/hosts/gpu-01/0/?hours=24", "admin GpuSnapshot changelist"),
    ("admin Deployment changelist", "/admin/deployments/deployment/", None),
    ("admin Gpu changelist", "/admin/gpus/gpu/", None),
    ("admin GpuSnapshot changelist", "/bench-admin/gpus/gpusnapshot/", None),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", default="sqlite", help="sqlite, postgres or a URL")
    parser.add_argument("--quick", action="store_true", help="2 h of history, fewer requests")
    parser.add_argument("--hours", type=float, default=None, help="hours of 5 s history")
    parser.add_argument("--requests", type=int, default=None, help="timed requests per page")
    parser.add_argument("--load", nargs=2, metavar=("URL", "COOKIE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.hours = args.hours or (2 if args.quick else 24)
    args.requests = args.requests or (10 if args.quick else 30)
    return args


# --- the server process: uvicorn imports this module for ``application`` ----------------------


def __getattr__(name: str) -> Any:
    """``uvicorn benchmarks.pages_at_scale:application``: the console's ASGI app plus a second
    admin site that lists GpuSnapshot, for the baseline (this process only)."""
    if name != "application":
        raise AttributeError(name)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.contrib import admin
    from django.core.asgi import get_asgi_application
    from django.urls import path

    import config.urls
    from gpus.models import GpuSnapshot

    site = admin.AdminSite(name="bench_admin")
    site.register(GpuSnapshot, admin.ModelAdmin)
    config.urls.urlpatterns.append(path("bench-admin/", site.urls))
    return get_asgi_application()


# --- seeding -----------------------------------------------------------------------------------


def seed_fleet(now: Any) -> dict[str, Any]:
    """Teams, an admin, hosts and GPUs (current readings), models, deployments with
    allocations and events."""
    from accounts.models import Membership, Role, Team, User
    from deployments.models import (
        Deployment,
        DeploymentEvent,
        EngineImage,
        EventKind,
        GpuAllocation,
    )
    from deployments.states import State
    from gpus.models import Gpu, Host, HostStatus
    from models_registry.models import Model, StorageMount

    rng = random.Random(9)
    admin = User.objects.create_user(username="bench-admin", password="x", role=Role.ADMIN)  # noqa: S106
    teams = Team.objects.bulk_create(
        [Team(slug=f"team-{i:02d}", name=f"Team {i:02d}") for i in range(TEAMS)]
    )
    for team in teams:
        member = User.objects.create_user(username=f"member-{team.slug}", role=Role.MEMBER)
        Membership.objects.create(user=member, team=team)
    hosts = Host.objects.bulk_create(
        [Host(name=f"gpu-{i + 1:02d}", status=HostStatus.ONLINE, last_heartbeat=now,
              last_collected=now) for i in range(HOSTS)]
    )  # fmt: skip
    gpus = Gpu.objects.bulk_create(
        [
            Gpu(host=host, index=index, uuid=f"GPU-{host.name}-{index}",
                name="NVIDIA H100 80GB HBM3", memory_total_mib=81_559, present=True,
                source="nvml", seen_at=now, memory_used_mib=40_000, memory_free_mib=41_000,
                memory_berth_mib=39_000, memory_foreign_mib=1_000, utilization_gpu_pct=50,
                temperature_c=60, power_w=350.0, power_limit_w=700.0)
            for host in hosts
            for index in range(GPUS_PER_HOST)
        ]
    )  # fmt: skip
    mount = StorageMount.objects.create(
        name="store", canonical_prefix="/store", local_path="/srv/store",
        host_path="/srv/store", container_path="/models",
    )  # fmt: skip
    models = Model.objects.bulk_create(
        [Model(team=team, mount=mount, path=f"/store/{team.slug}/model-{n}", status="ok")
         for team in teams for n in range(2)]
    )  # fmt: skip
    image = EngineImage.objects.create(name="vllm", reference="vllm/vllm-openai:v0.11.0")
    # One GPU each for the live ones (one active allocation per GPU), the rest ended.
    live_states = [State.READY] * 50 + [State.LOADING] * 10 + [State.UNHEALTHY] * 5
    ended = [State.STOPPED, State.FAILED]
    deployments = []
    for number in range(DEPLOYMENTS):
        state = live_states[number] if number < len(live_states) else rng.choice(ended)
        model = models[number % len(models)]
        deployments.append(
            Deployment(
                name=f"dep-{number:03d}", team=model.team, model=model,
                host=gpus[number % len(gpus)].host if number < len(live_states)
                else hosts[number % HOSTS],
                image=image, gpu_count=1, state=state, requested_by=admin,
                host_port=30000 + number if number < len(live_states) else None,
                last_error="" if state != State.FAILED else "the engine exited with code 1",
            )
        )  # fmt: skip
    deployments = Deployment.objects.bulk_create(deployments)
    GpuAllocation.objects.bulk_create(
        [
            GpuAllocation(deployment=d, gpu=gpus[n % len(gpus)], generation=1,
                          active=n < len(live_states),
                          released_at=None if n < len(live_states) else now)
            for n, d in enumerate(deployments)
            if n < len(live_states) or n % 5 == 0
        ]
    )  # fmt: skip
    events = [
        DeploymentEvent(deployment=d, generation=1, kind=EventKind.STATE, state=s,
                        message=f"→ {s}", time=now - timedelta(minutes=5 - k))
        for d in deployments
        for k, s in enumerate(["queued", "launching", "loading", d.state])
    ]  # fmt: skip
    DeploymentEvent.objects.bulk_create(events, batch_size=2000)
    return {"admin": admin, "gpus": gpus, "events": len(events)}


def seed_history(gpus: list[Any], now: Any, hours: float) -> int:
    """``hours`` of 5-second raw snapshots for every GPU, written in bulk."""
    from django.db import connection, transaction

    steps = int(hours * 3600 / SNAPSHOT_INTERVAL_S)
    start = now - timedelta(seconds=steps * SNAPSHOT_INTERVAL_S)
    columns = ", ".join(SNAPSHOT_COLUMNS)

    def rows(gpu_id: int) -> Any:
        for step in range(steps):
            moment = start + timedelta(seconds=(step + 1) * SNAPSHOT_INTERVAL_S)
            used = 30_000 + (step * 37 + gpu_id * 101) % 20_000
            yield (gpu_id, moment, "raw", "nvml", used, 81_559, 1_000, step % 101,
                   55 + step % 20, 300.0 + step % 300, "[]", 1)  # fmt: skip

    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            sql = f"COPY gpus_gpusnapshot ({columns}) FROM STDIN"
            with cursor.cursor.copy(sql) as copy:
                for gpu in gpus:
                    for row in rows(gpu.pk):
                        copy.write_row(row)
        else:
            marks = ", ".join(["%s"] * len(SNAPSHOT_COLUMNS))
            sql = f"INSERT INTO gpus_gpusnapshot ({columns}) VALUES ({marks})"  # noqa: S608
            for gpu in gpus:
                cursor.executemany(
                    sql,
                    [(r[0], r[1].strftime(SQLITE_TIME), *r[2:]) for r in rows(gpu.pk)],
                )
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE gpus_gpusnapshot")
    return steps * len(gpus)


def compaction_leaves() -> dict[str, int]:
    """Run the agent's real compaction on every host; what it rolled up and deleted."""
    from gpus.inventory import compact_history
    from gpus.models import GpuSnapshot, Host

    before = GpuSnapshot.objects.count()
    results = [compact_history(host) for host in Host.objects.all()]
    after = GpuSnapshot.objects.count()
    return {"rows_before": before, "rows_after": after, "runs": len(results)}


# --- measuring ---------------------------------------------------------------------------------


def query_counts(admin: Any) -> dict[str, int]:
    """SQL queries per page, from Django's test client in this process (same database)."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client(HTTP_HOST="localhost")
    client.force_login(admin)
    counts = {}
    for label, path, _ in PAGES:
        if path.startswith("/bench-admin/"):
            continue  # served by the server process's extra admin site only
        client.get(path)
        with CaptureQueriesContext(connection) as queries:
            response = client.get(path)
        if response.status_code != 200:
            raise SystemExit(f"{path} answered {response.status_code} to the test client")
        counts[label] = len(queries)
    return counts


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_database_url() -> str:
    from django.db import connection

    name = connection.settings_dict["NAME"]
    if connection.vendor == "sqlite":
        return f"sqlite:///{name}"
    return postgres_url().rsplit("/", 1)[0] + f"/{name}"


def start_server(port: int, log: Any) -> subprocess.Popen:
    """uvicorn, one process, as ``berth_up`` runs it; its log goes to ``log`` (a pipe nobody
    reads would fill up and stall the server)."""
    env = {**os.environ, "DATABASE_URL": server_database_url(), "REDIS_URL": redis_url(),
           "DJANGO_SETTINGS_MODULE": "config.settings", "DEBUG": "0"}  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "benchmarks.pages_at_scale:application",
         "--host", "127.0.0.1", "--port", str(port), "--lifespan", "off", "--no-access-log"],
        env=env, cwd=Path(__file__).resolve().parent.parent,
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def get(connection: http.client.HTTPConnection, path: str, cookie: str) -> tuple[int, int]:
    connection.request("GET", path, headers={"Cookie": f"sessionid={cookie}"})
    response = connection.getresponse()
    body = response.read()
    return response.status, len(body)


def wait_for_server(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"uvicorn exited with {server.returncode}; its log is {LOG}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"uvicorn did not listen on {port} within {SERVER_START_S} s")


def time_pages(port: int, cookie: str, requests: int) -> dict[str, dict]:
    """Sequential GETs of every page (two untimed first); milliseconds to the last byte."""
    results = {}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for label, path, _ in PAGES:
            for _ in range(2):
                status, _size = get(connection, path, cookie)
                if status != 200:
                    raise SystemExit(f"{path} answered {status}")
            durations, size = [], 0
            for _ in range(requests):
                started = time.perf_counter()
                _status, size = get(connection, path, cookie)
                durations.append((time.perf_counter() - started) * 1000)
            results[label] = {**summary(durations), "bytes": size}
    finally:
        connection.close()
    return results


def load_loop(url: str, cookie: str) -> None:
    """The second process: GET one page in a loop until SIGTERM; prints how many it made."""
    host, port = url.rsplit(":", 1)[0], int(url.rsplit(":", 1)[1].split("/")[0])
    path = "/" + url.split("/", 1)[1] if "/" in url else "/"
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    connection = http.client.HTTPConnection(host, port, timeout=120)
    done = 0
    while not stop:
        get(connection, path, cookie)
        done += 1
    print(done, flush=True)


def measure(admin: Any, requests: int) -> tuple[dict, int, float]:
    from django.test import Client

    client = Client(HTTP_HOST="localhost")
    client.force_login(admin)
    cookie = client.cookies["sessionid"].value
    port = free_port()
    LOG.parent.mkdir(parents=True, exist_ok=True)
    log = LOG.open("wb")
    server = start_server(port, log)
    load = None
    try:
        wait_for_server(port, server)
        load = subprocess.Popen(
            [sys.executable, __file__, "--load", f"127.0.0.1:{port}{LOAD_PAGE}", cookie],
            stdout=subprocess.PIPE, stderr=log,
        )  # fmt: skip
        started = time.monotonic()
        timings = time_pages(port, cookie, requests)
        seconds = time.monotonic() - started
        load.send_signal(signal.SIGTERM)
        out, _ = load.communicate(timeout=60)
        if load.returncode != 0:
            raise SystemExit(f"the load process failed; its log is {LOG}")
        return timings, int(out.decode().strip() or 0), seconds
    finally:
        for process in (load, server):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
        log.close()


def main() -> None:
    args = parse_args()
    if args.load:
        load_loop(*args.load)
        return
    os.environ.setdefault("LOG_LEVEL", "warning")  # not a line per request, here or in uvicorn
    setup_django(database_url_for(args.database))
    from django.utils import timezone

    with throwaway_database() as vendor:
        now = timezone.now()
        started = time.monotonic()
        fleet = seed_fleet(now)
        seeded_fleet_s = time.monotonic() - started
        started = time.monotonic()
        snapshots = seed_history(fleet["gpus"], now, args.hours)
        seeded_history_s = time.monotonic() - started
        compaction = compaction_leaves()
        print(f"{vendor}: {len(fleet['gpus'])} GPUs, {DEPLOYMENTS} deployments, "
              f"{fleet['events']:,} events in {seeded_fleet_s:.1f} s; {snapshots:,} snapshots "
              f"({args.hours:g} h at {SNAPSHOT_INTERVAL_S} s) in {seeded_history_s:.1f} s "
              f"({snapshots / seeded_history_s:,.0f} rows/s); compaction (raw kept 48 h) left "
              f"{compaction['rows_after']:,} of {compaction['rows_before']:,}")  # fmt: skip
        queries = query_counts(fleet["admin"])
        timings, load_requests, seconds = measure(fleet["admin"], args.requests)
        LOG.unlink()  # kept only when something failed

    rows, targets = [], []
    for label, _path, baseline in PAGES:
        stats = timings[label]
        ratio = stats["p95"] / timings[baseline]["p95"] if baseline else None
        count = queries.get(label)
        rows.append((label, stats["p50"], stats["p95"], stats["max"], count if count is not None
                     else "-", f"{stats['bytes'] / 1024:,.0f}",
                     f"{ratio:.2f}" if ratio is not None else "-"))  # fmt: skip
        if not label.startswith("admin"):
            targets.append(target(f"{label} p95 ms", stats["p95"], f"<= {P95_TARGET_MS}",
                                  stats["p95"] <= P95_TARGET_MS))  # fmt: skip
            targets.append(target(f"{label} SQL queries", count, f"<= {QUERY_TARGET}",
                                  count <= QUERY_TARGET))  # fmt: skip
    print(f"\n{args.requests} requests per page over HTTP (uvicorn, 1 process) while a second "
          f"process GETs {LOAD_PAGE} ({load_requests:,} requests in {seconds:.0f} s, "
          f"{load_requests / seconds:.1f}/s)")  # fmt: skip
    print_table(rows, ("page", "p50 ms", "p95 ms", "max ms", "queries", "KiB",
                       "p95 / admin"))  # fmt: skip
    emit_json(
        "pages_at_scale",
        {
            "database": vendor,
            "gpus": len(fleet["gpus"]),
            "deployments": DEPLOYMENTS,
            "deployment_events": fleet["events"],
            "snapshots": snapshots,
            "history_hours": args.hours,
            "compaction": compaction,
            "requests_per_page": args.requests,
            "load": {"page": LOAD_PAGE, "requests": load_requests, "seconds": round(seconds, 1)},
            "pages_ms": timings,
            "queries": queries,
            "audit_review": "measured by benchmarks/audit_review.py",
            "targets": targets,
        },
    )


if __name__ == "__main__":
    main()
