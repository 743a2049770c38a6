"""Streaming: concurrent viewers of one deployment's status stream on one ASGI worker, and the
time from a change being published to each viewer receiving it.

Starts one uvicorn worker (``config.asgi``, through ``config.processes.Supervisor``) on a
throw-away SQLite database and the benchmark Redis database, signs a member in (a session cookie
made with Django's test client), then opens ``--viewers`` concurrent Server-Sent Events
connections to ``/deployments/<uuid>/stream/`` (raw asyncio streams, HTTP/1.1), each counted as
connected once its first ``event: status`` arrives. Then publishes ``--changes`` changes through
the real ``deployments.changes.publish`` (Redis pub/sub), one after another, each once every
viewer has the previous one, and records publish→receipt per viewer. Reports connections made,
latency p50/p95/p99 (target: 1,000 viewers, p99 under 1 s), the worker's RSS before and with
the viewers (growth per stream) and its thread count::

    .venv/bin/python benchmarks/streaming.py [--viewers 1000] [--changes 3] [--database postgres]

Client and server share this machine's CPUs, so the latency includes the client's own work
reading 1,000 sockets. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    BASE_DIR,
    database_url_for,
    emit_json,
    print_table,
    setup_django,
    summary,
    target,
    throwaway_database,
)

START_DEADLINE_S = 60
CONNECT_DEADLINE_S = 60
CHANGE_DEADLINE_S = 30
BATCH = 100  # connections opened at once
P99_TARGET_S = 1.0
FULL_SIZE = 1000  # viewers the target names; smaller runs are recorded, not judged
RSS_TARGET_KB = 100  # per stream, B11 in benchmarks/README.md


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", default="sqlite", help="sqlite, postgres or a URL")
    parser.add_argument("--viewers", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="200 viewers, 2 changes")
    args = parser.parse_args()
    if args.quick:
        args.viewers, args.changes = min(args.viewers, 200), min(args.changes, 2)
    return args


def seed() -> tuple[Any, str]:
    """A member of team A and one of its deployments; (deployment, session cookie)."""
    from django.conf import settings
    from django.test import Client

    from accounts.models import Membership, Role, Team, User
    from deployments.models import Deployment
    from tests.deployment_builders import deployment, host_with_gpus, registered_model

    team = Team.objects.create(slug="team-a", name="Team A")
    user = User.objects.create_user(username="viewer", role=Role.MEMBER)  # no password: no login
    Membership.objects.create(user=user, team=team)
    model = registered_model(team, BASE_DIR / "var" / "bench" / "models", "tiny")
    made = deployment(team, model, host_with_gpus("stream-01", count=1))
    # Redis pub/sub channels are server-wide (not per database number): a primary key of its
    # own keeps other Berth processes' deployment 1 off this stream.
    unique = random.randrange(10**8, 10**9)
    Deployment.objects.filter(pk=made.pk).update(id=unique)
    made = Deployment.objects.get(pk=unique)
    client = Client()
    client.force_login(user)
    name = settings.SESSION_COOKIE_NAME
    return made, f"{name}={client.cookies[name].value}"


def child_database_url(connection: Any) -> str:
    """The throw-away database (Django's test copy) as a URL for the server process."""
    if connection.vendor == "sqlite":
        return f"sqlite:///{connection.settings_dict['NAME']}"
    return f"{os.environ['DATABASE_URL'].rsplit('/', 1)[0]}/{connection.settings_dict['NAME']}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            fields[key] = int(value.split()[0])
    return fields


class Viewer:
    """One EventSource-like connection: the perf_counter time of every status event."""

    def __init__(self, port: int, path: str, cookie: str) -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
            f"Cookie: {cookie}\r\nConnection: keep-alive\r\n\r\n"
        ).encode()
        self.port = port
        self.events: list[float] = []
        self.error = ""
        self.changed = asyncio.Event()

    async def run(self) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError as exc:
            self.error = f"connect: {exc}"
            return
        try:
            writer.write(self.request)
            status = await reader.readline()
            if b" 200 " not in status:
                self.error = status.decode(errors="replace").strip() or "no answer"
                return
            while line := await reader.readline():
                if line.startswith(b"event: status"):
                    self.events.append(time.perf_counter())
                    self.changed.set()
            self.error = "the server closed the stream"
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            writer.close()


async def until(predicate, deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


async def drive(args: argparse.Namespace, port: int, made: Any, cookie: str, pid: int) -> dict:
    from django.db import connection

    from deployments.changes import publish

    # One publishing thread with its database connection opened before the viewers arrive
    # (publish() defers to on_commit, which asks the connection): on PostgreSQL the viewers
    # may use up every connection the server allows.
    publisher = ThreadPoolExecutor(max_workers=1)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(publisher, lambda: connection.ensure_connection())
    path = f"/deployments/{made.public_id}/stream/"
    viewers = [Viewer(port, path, cookie) for _ in range(args.viewers)]
    tasks = []
    started = time.monotonic()
    for first in range(0, len(viewers), BATCH):
        batch = viewers[first : first + BATCH]
        tasks += [asyncio.create_task(v.run()) for v in batch]
        await until(lambda b=batch: all(v.events or v.error for v in b), CONNECT_DEADLINE_S)
    connect_s = time.monotonic() - started
    live = [v for v in viewers if v.events and not v.error]
    with_viewers = proc_status(pid)
    latencies, spans = [], []
    for _change in range(args.changes):
        sent = time.perf_counter()
        await loop.run_in_executor(publisher, publish, made.pk)
        await until(lambda s=sent: all(v.events[-1] >= s for v in live), CHANGE_DEADLINE_S)
        got = [next(t for t in v.events if t >= sent) - sent for v in live if v.events[-1] >= sent]
        latencies += got
        spans.append(max(got, default=float("nan")))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await loop.run_in_executor(publisher, lambda: connection.close())
    publisher.shutdown()
    errors: dict[str, int] = {}
    for viewer in viewers:
        if viewer.error and not viewer.events:
            errors[viewer.error[:80]] = errors.get(viewer.error[:80], 0) + 1
    return {
        "connected": len(live),
        "connect_s": round(connect_s, 2),
        "latency_s": latencies,
        "all_viewers_s": spans,
        "missed": len(live) * args.changes - len(latencies),
        "server": with_viewers,
        "errors": errors,
    }


def main() -> None:
    args = parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted_fds = min(hard, max(soft, 2 * args.viewers + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted_fds, hard))  # children inherit it
    setup_django(database_url_for(args.database))
    from django.conf import settings
    from django.db import connection

    from config.processes import Supervisor, child_environment, wait_until

    with throwaway_database() as vendor:
        made, cookie = seed()
        port = free_port()
        env = child_environment(
            DATABASE_URL=child_database_url(connection),
            REDIS_URL=settings.REDIS_URL,
            LOG_LEVEL="warning",  # not one access line per viewer
        )
        argv = [sys.executable, "-m", "uvicorn", "config.asgi:application"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        argv += ["--no-access-log", "--backlog", str(2 * args.viewers)]
        supervisor = Supervisor()
        server = supervisor.start("uvicorn", argv, env=env, cwd=BASE_DIR, stop_signal=signal.SIGINT)
        try:
            stopped = lambda: not server.running  # noqa: E731
            if not wait_until(lambda: _answers(port), START_DEADLINE_S, abort=stopped):
                raise SystemExit("uvicorn did not start (see its output above)")
            idle = proc_status(server.process.pid)
            result = asyncio.run(drive(args, port, made, cookie, server.process.pid))
        finally:
            supervisor.stop_all(lambda _message: None)
    report(args, vendor, idle, result)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def report(args: argparse.Namespace, vendor: str, idle: dict[str, int], result: dict) -> None:
    nothing = {"p50": None, "p95": None, "p99": None, "median": None}
    latency = summary(result["latency_s"]) if result["latency_s"] else nothing
    spans = summary(result["all_viewers_s"]) if result["latency_s"] else nothing
    connected = result["connected"]
    rss_growth_kb = (result["server"]["VmRSS"] - idle["VmRSS"]) / max(connected, 1)
    threads = result["server"]["Threads"]
    print(
        f"database: {vendor}; "
        f"{connected} of {args.viewers} viewers connected in {result['connect_s']} s; "
        f"{args.changes} changes published; {result['missed']} deliveries missed"
    )
    if result["errors"]:
        print("connection failures:", result["errors"])
    print_table(
        [
            ("publish -> viewer p50 s", latency["p50"]),
            ("publish -> viewer p95 s", latency["p95"]),
            ("publish -> viewer p99 s", latency["p99"]),
            ("publish -> last viewer, median of changes s", spans["median"]),
            ("worker RSS idle MiB", idle["VmRSS"] / 1024),
            (f"worker RSS with {connected} streams MiB", result["server"]["VmRSS"] / 1024),
            ("RSS growth per stream KiB", rss_growth_kb),
            ("worker threads idle / with streams", f"{idle['Threads']} / {threads}"),
        ],
        ("measure", "value"),
    )
    p99 = latency["p99"] if latency["p99"] is not None else float("inf")
    emit_json(
        "streaming",
        {
            "database": vendor,
            "viewers": args.viewers,
            "connected": connected,
            "connect_s": result["connect_s"],
            "changes": args.changes,
            "missed": result["missed"],
            "latency_s": latency,
            "last_viewer_s": spans,
            "rss_idle_kib": idle["VmRSS"],
            "rss_with_streams_kib": result["server"]["VmRSS"],
            "rss_growth_per_stream_kib": round(rss_growth_kb, 1),
            "threads_idle": idle["Threads"],
            "threads_with_streams": threads,
            "connection_errors": result["errors"],
            "targets": [
                target(
                    "viewers connected",
                    connected,
                    f"{FULL_SIZE} (all)",
                    connected == args.viewers if args.viewers >= FULL_SIZE else None,
                ),
                target("publish->viewer p99 s", p99, "< 1", p99 < P99_TARGET_S),
                target(
                    "RSS growth per stream KiB",
                    round(rss_growth_kb, 1),
                    "<= 100",
                    rss_growth_kb <= RSS_TARGET_KB,
                ),
                target("deliveries missed", result["missed"], "0", result["missed"] == 0),
            ],
        },
    )


if __name__ == "__main__":
    main()
