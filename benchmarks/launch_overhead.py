"""Launch overhead: Berth's path from deploy request to container started, against a plain
``docker run`` of the same stand-in image, and the delay from the engine answering healthy to
Berth's state ``ready``.

Uses the stand-in engine (``docker/test-engine/``, NOT vLLM; built by
``deployments.runtime.stand_in.build_engine_image``), the local Docker engine, a throw-away SQLite
database and the benchmark Redis database, under its own instance name (``BERTH_INSTANCE=
berth-bench``, engine ports 31500-31999) so no other Berth on this machine sees its containers.

1. **docker run**: ``containers.run(detach=True)`` of the stand-in with its model mounted and a
   published port, until Docker reports it running (``--runs`` times).
2. **Berth, in-process**: ``deployments.services.request_deployment`` (validate, record, audit,
   enqueue on commit) and then the launch job's function
   ``deployments.runtime.jobs.launch_job`` called directly in this process — no queue, so this
   is Berth's own work: re-inspecting the model on the host, building the spec, creating and
   starting the container (``--runs`` times). The ratio to (1) is the overhead.
3. **Berth, through a real worker**: ``manage.py berth_worker host:<name> --with-scheduler
   --simple`` (the job loop the host agent runs: a SimpleWorker with RQ's scheduler), started
   beforehand; request → ``launching`` (job picked up) → ``loading`` (container started), from
   the deployment's timeline (``--worker-runs`` times). Then, with ``ENGINE_LOAD_SECONDS`` of
   "loading", this script polls the engine's ``/health`` itself every 20 ms; the delay from
   its first 200 to the ``ready`` event is the watch loop's (default
   ``BERTH_MONITOR_INTERVAL_S`` = 1 s, re-booked through RQ's scheduler). Target under 2 s.

::

    .venv/bin/python benchmarks/launch_overhead.py [--runs 7] [--worker-runs 5]

Prints a table and one JSON line. Every container it started is removed at the end.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    BASE_DIR,
    emit_json,
    print_table,
    setup_django,
    summary,
    target,
    throwaway_database,
)

INSTANCE = "berth-bench"
PORTS = ("31500", "31999")
LOAD_SECONDS = "2"
DEADLINE_S = 60
HEALTH_POLL_S = 0.02
READY_TARGET_S = 2.0
ENGINE_PORT = 8000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="docker run and in-process launches")
    parser.add_argument("--worker-runs", type=int, default=5, help="launches through the worker")
    parser.add_argument("--quick", action="store_true", help="3 runs, 2 worker runs")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.worker_runs = min(args.runs, 3), min(args.worker_runs, 2)
    return args


def wait_for(check, deadline_s: float = DEADLINE_S, poll_s: float = 0.01, what: str = "") -> Any:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if result := check():
            return result
        time.sleep(poll_s)
    raise SystemExit(f"timed out after {deadline_s} s waiting for {what}")


# --- setting up ----------------------------------------------------------------------------------


class Fixture:
    """Rows and files one launch needs: member, team, model (a real tiny directory), image."""

    def __init__(self, root: Path, image_tag: str) -> None:
        from accounts.models import Membership, Role, Team, User
        from deployments.models import EngineImage
        from deployments.runtime.stand_in import engine_health_command
        from models_registry.tiny_model import write_model
        from tests.deployment_builders import registered_model

        self.root = root
        self.team = Team.objects.create(slug="team-a", name="Team A")
        self.user = User.objects.create_user(username="bench", role=Role.MEMBER)
        Membership.objects.create(user=self.user, team=self.team)
        write_model(root / "team-a" / "tiny")
        self.model = registered_model(self.team, root, "tiny")
        self.image = EngineImage.objects.create(
            name="stand-in",
            reference=image_tag,
            gpu_capable=False,
            cpu_capable=True,
            is_stand_in=True,
            health_command=engine_health_command(),
            environment={"ENGINE_LOAD_SECONDS": LOAD_SECONDS},
        )

    def request(self, host: Any, name: str) -> Any:
        from deployments.services import DeployRequest, request_deployment

        data = DeployRequest(
            team=self.team, model=self.model, host=host, image=self.image, name=name, gpu_count=0
        )
        return request_deployment(self.user, data)


# --- 1. docker run -------------------------------------------------------------------------------


def docker_runs(client: Any, tag: str, model_dir: Path, numbers: list[int]) -> list[float]:
    """Seconds from ``containers.run`` to Docker reporting the container running."""
    seconds = []
    for number in numbers:
        started = time.perf_counter()
        container = client.containers.run(
            tag,
            ["--model", "/models/tiny", "--port", str(ENGINE_PORT)],
            name=f"{INSTANCE}-plain-{os.getpid()}-{number}",
            detach=True,
            environment={"ENGINE_LOAD_SECONDS": LOAD_SECONDS},
            volumes={str(model_dir): {"bind": "/models/tiny", "mode": "ro"}},
            ports={f"{ENGINE_PORT}/tcp": ("127.0.0.1", None)},
            labels={"berth.instance": INSTANCE},
        )
        wait_for(lambda c=container: c.reload() or c.status == "running", what="docker run")
        seconds.append(time.perf_counter() - started)
        container.remove(force=True)
    return seconds


# --- 2. in-process -------------------------------------------------------------------------------


def in_process_launches(
    fixture: Fixture, host: Any, client: Any, numbers: list[int]
) -> dict[str, list]:
    """Request + launch job function in this process; seconds per step."""
    from deployments.models import Deployment
    from deployments.runtime.jobs import launch_job
    from deployments.states import State

    request_s, launch_s, total_s = [], [], []
    for number in numbers:
        started = time.perf_counter()
        deployment = fixture.request(host, f"inproc-{number}")
        requested = time.perf_counter()
        result = launch_job(deployment.pk, deployment.generation)
        done = time.perf_counter()
        deployment = Deployment.objects.get(pk=deployment.pk)
        if result != "loading" or deployment.state != State.LOADING:
            raise SystemExit(f"in-process launch {number}: {result} ({deployment.last_error})")
        if client.containers.get(deployment.container_id).status != "running":
            raise SystemExit(f"in-process launch {number}: the container is not running")
        request_s.append(requested - started)
        launch_s.append(done - requested)
        total_s.append(done - started)
        client.containers.get(deployment.container_id).remove(force=True)
    return {"request_s": request_s, "launch_s": launch_s, "total_s": total_s}


# --- 3. through a worker -------------------------------------------------------------------------


class HealthWatcher(threading.Thread):
    """Polls ``/health`` on the engine's published port; the wall time of the first 200."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.healthy_at: datetime | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.healthy_at is None:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            try:
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    self.healthy_at = datetime.now(UTC)
            except (OSError, http.client.HTTPException):
                pass
            finally:
                connection.close()
            self.stop.wait(HEALTH_POLL_S)


def event_time(deployment: Any, state: str) -> datetime | None:
    event = deployment.events.filter(kind="state", state=state).order_by("time").first()
    return event.time if event else None


def worker_launches(fixture: Fixture, host: Any, runs: int) -> dict[str, list]:
    """Launches through a running worker: request → launching → loading, healthy → ready."""
    from deployments.models import Deployment
    from deployments.states import State

    pick_up_s, started_s, ready_lag_s = [], [], []
    for number in range(runs):
        requested_at = datetime.now(UTC)
        made = fixture.request(host, f"worker-{number}")

        def loading(pk: int = made.pk) -> Any:
            row = Deployment.objects.get(pk=pk)
            if row.state == State.FAILED:
                raise SystemExit(f"worker launch failed: {row.last_error}")
            return row if row.state in (State.LOADING, State.READY) and row.host_port else None

        deployment = wait_for(loading, what="the worker to start the container")
        watcher = HealthWatcher(deployment.host_port)
        watcher.start()
        wait_for(
            lambda d=deployment: Deployment.objects.get(pk=d.pk).state == State.READY,
            what="state ready",
        )
        # Berth's own probe may win the race by a few milliseconds: give ours a moment too
        # (then the lag is negative, within this script's 20 ms polling).
        wait_for(lambda w=watcher: w.healthy_at, deadline_s=5, what="this script's /health")
        watcher.stop.set()
        watcher.join()
        launching, started = event_time(deployment, "launching"), event_time(deployment, "loading")
        ready = event_time(deployment, "ready")
        if watcher.healthy_at is None:
            raise SystemExit("the engine never answered /health to this script")
        pick_up_s.append((launching - requested_at).total_seconds())
        started_s.append((started - requested_at).total_seconds())
        ready_lag_s.append((ready - watcher.healthy_at).total_seconds())
    return {"pick_up_s": pick_up_s, "started_s": started_s, "ready_lag_s": ready_lag_s}


def start_worker(queue_name: str) -> Any:
    from django.db import connection

    from config.processes import Supervisor, child_environment

    env = child_environment(DATABASE_URL=f"sqlite:///{connection.settings_dict['NAME']}")
    env["LOG_LEVEL"] = "warning"
    argv = [sys.executable, str(BASE_DIR / "manage.py"), "berth_worker", queue_name]
    argv += ["--with-scheduler", "--simple"]
    supervisor = Supervisor()
    supervisor.start("worker", argv, env=env, cwd=BASE_DIR, stop_signal=signal.SIGTERM)
    return supervisor


def wait_for_worker(queue_name: str) -> None:
    from rq import Worker

    from core.queues import get_queue

    queue = get_queue(queue_name)
    wait_for(lambda: Worker.all(queue=queue), deadline_s=DEADLINE_S, poll_s=0.1, what="the worker")


def clean_up(client: Any, queues: list[str]) -> None:
    from core.queues import get_queue

    for container in client.containers.list(
        all=True, filters={"label": f"berth.instance={INSTANCE}"}
    ):
        container.remove(force=True)
    for volume in client.volumes.list(filters={"name": f"{INSTANCE}-cache-"}):
        volume.remove(force=True)
    for name in queues:
        queue = get_queue(name)
        queue.empty()
        registry = queue.scheduled_job_registry
        for job_id in registry.get_job_ids():
            registry.remove(job_id, delete_job=True)


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    os.environ["BERTH_INSTANCE"] = INSTANCE
    os.environ["BERTH_ENGINE_PORT_MIN"], os.environ["BERTH_ENGINE_PORT_MAX"] = PORTS
    setup_django()
    from django.conf import settings

    from deployments.runtime.stand_in import build_engine_image
    from gpus.collectors import docker_client
    from gpus.models import Host

    client = docker_client()
    started = time.perf_counter()
    tag = build_engine_image(client)
    build_s = time.perf_counter() - started
    queues = [f"host:{INSTANCE}-inproc-{os.getpid()}", f"host:{INSTANCE}-worker-{os.getpid()}"]
    supervisor = None
    try:
        with throwaway_database(), tempfile.TemporaryDirectory(dir=BASE_DIR / "var") as scratch:
            fixture = Fixture(Path(scratch), tag)
            inproc_host = Host.objects.create(name=queues[0].removeprefix("host:"))
            worker_host = Host.objects.create(name=queues[1].removeprefix("host:"))
            model_dir = Path(scratch) / "team-a" / "tiny"
            plain: list[float] = []
            berth: dict[str, list] = {"request_s": [], "launch_s": [], "total_s": []}
            for number in range(args.runs):  # alternating, so drift on a busy machine hits both
                plain += docker_runs(client, tag, model_dir, [number])
                for key, values in in_process_launches(
                    fixture, inproc_host, client, [number]
                ).items():
                    berth[key] += values
            supervisor = start_worker(queues[1])
            wait_for_worker(queues[1])
            worker = worker_launches(fixture, worker_host, args.worker_runs)
    finally:
        if supervisor is not None:
            supervisor.stop_all(lambda _message: None)
        clean_up(client, queues)
        client.close()
    report(args, build_s, plain, berth, worker, settings.BERTH_MONITOR_INTERVAL_S)


def report(args, build_s: float, plain: list, berth: dict, worker: dict, interval: float) -> None:
    stats = {
        "docker_run_s": summary(plain),
        "berth_request_s": summary(berth["request_s"]),
        "berth_launch_job_s": summary(berth["launch_s"]),
        "berth_total_s": summary(berth["total_s"]),
        "worker_pick_up_s": summary(worker["pick_up_s"]),
        "worker_started_s": summary(worker["started_s"]),
        "healthy_to_ready_s": summary(worker["ready_lag_s"]),
    }
    ratio = stats["berth_total_s"]["median"] / stats["docker_run_s"]["median"]
    print(
        f"stand-in image ready in {build_s:.1f} s; {args.runs} runs each of docker run and "
        f"Berth in-process (alternating), {args.worker_runs} via a worker"
    )
    print_table(
        [
            (name, s["n"], s["median"], s["min"], s["max"], f"{s['spread_pct']}%")
            for name, s in stats.items()
        ],
        ("seconds", "n", "median", "min", "max", "spread"),
    )
    lag = stats["healthy_to_ready_s"]["max"]
    print(
        f"Berth in-process / docker run (medians): {ratio:.2f}x; healthy -> ready worst "
        f"{lag:.2f} s at BERTH_MONITOR_INTERVAL_S={interval:g}"
    )
    emit_json(
        "launch_overhead",
        {
            "runs": args.runs,
            "worker_runs": args.worker_runs,
            "monitor_interval_s": interval,
            "engine_load_seconds": float(LOAD_SECONDS),
            **stats,
            "berth_over_docker_ratio": round(ratio, 2),
            "targets": [
                target("Berth in-process / docker run", round(ratio, 2), "record", None),
                target(
                    "request -> job picked up s (worker, p95)",
                    stats["worker_pick_up_s"]["p95"],
                    "<= 0.2",
                    stats["worker_pick_up_s"]["p95"] <= 0.2,
                ),
                target(
                    "request -> container started s (worker, p95)",
                    stats["worker_started_s"]["p95"],
                    "<= 1",
                    stats["worker_started_s"]["p95"] <= 1,
                ),
                target("healthy -> ready s (worst)", round(lag, 3), "< 2", lag < READY_TARGET_S),
            ],
        },
    )


if __name__ == "__main__":
    main()
