"""The real engine behind Berth: vLLM 0.32 for CPUs (the image ``build_engine_image vllm-cpu``
makes from ``docker/vllm-cpu/``), serving tiny models written by ``models_registry.tiny_model``.

1. **Request → ready, Berth against ``docker run``**: one CPU deployment of the tiny Llama is
   started once (filling its compile cache volume), then, alternating ``--runs`` times: a plain
   ``docker run`` of exactly the container Berth makes (``launch_spec.container_kwargs``: same
   image, arguments, environment, memory limit and cache volume) until ``/health`` answers 200
   (polled every 50 ms), and Berth's restart of the deployment (request → a real worker on the
   host's queue → launch → watch → ``ready``), to the ``ready`` event. Goal: ratio of medians
   <= 1.05.
2. **Cold against warm compile cache**: the first start of (1), on an empty cache volume,
   against its warm restarts; with the engine's own "init engine ... took" figure for each.
3. **Prewarm on and off** for a checkpoint of at least 1 GiB (random weights): two deployments
   of it, one on a worker with ``BERTH_PREWARM=on``, one with ``off``, each started once to
   fill its compile cache; then alternating restarts (``--prewarm-runs`` each), the model's files
   dropped from the page cache before each (``posix_fadvise(DONTNEED)``).

::

    .venv/bin/python benchmarks/real_engine.py [--runs 3] [--prewarm-runs 2] [--quick]

``--prewarm-runs 0`` measures (1) and (2) only. Each pair also says where the time went (picked
up, launch work, container start, the engine's own start, the watcher's lag).

Needs Docker and the image (it says how to build it). Prints a table and one JSON line; every
container, volume and file it made is removed at the end.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import sys
import tempfile
import time
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

INSTANCE = "berth-bench-vllm"
PORTS = ("32000", "32099")
DEADLINE_S = 900
RATIO_GOAL = 1.05
BIG_LAYERS = 36  # hidden 1024, 16 heads: 548 M parameters, 1.02 GiB in BF16
INIT_LINE = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="docker run / Berth pairs")
    parser.add_argument("--prewarm-runs", type=int, default=2, help="restarts per prewarm mode")
    parser.add_argument("--quick", action="store_true", help="2 pairs, 1 prewarm run each")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.prewarm_runs = min(args.runs, 2), min(args.prewarm_runs, 1)
    return args


def wait_for(check: Any, deadline_s: float = DEADLINE_S, poll_s: float = 0.05, what: str = ""):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if result := check():
            return result
        time.sleep(poll_s)
    raise SystemExit(f"timed out after {deadline_s} s waiting for {what}")


def healthy(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- the console's side --------------------------------------------------------------------------


class Console:
    """A throw-away console: a team, a member, the image on the allow-list, hosts with workers."""

    def __init__(self, root: Path, image: str) -> None:
        from accounts.models import Membership, Role, Team, User
        from deployments.runtime.engine_images import allow_list_cpu_engine
        from models_registry.models import StorageMount

        self.root = root
        self.team = Team.objects.create(slug="team-a", name="Team A")
        self.user = User.objects.create_user(username="bench", role=Role.MEMBER)
        Membership.objects.create(user=self.user, team=self.team)
        StorageMount.objects.create(
            name="store", canonical_prefix="/store", local_path=str(root),
            host_path=str(root), container_path="/models",
        )  # fmt: skip
        allow_list_cpu_engine("vllm-cpu", image, "0.32.0")
        self.workers: list[Any] = []

    def host(self, name: str, **env: str) -> Any:
        """A host on the local engine, its memory reported, with its own worker (``env``)."""
        from django.db import connection

        from config.processes import Supervisor, child_environment
        from gpus.host_resources import read_host_resources
        from gpus.hosts import register_host
        from gpus.inventory import heartbeat

        host = register_host(name)[0]
        heartbeat(host, resources=read_host_resources())
        host.refresh_from_db()
        worker_env = child_environment(DATABASE_URL=f"sqlite:///{connection.settings_dict['NAME']}")
        worker_env |= {"LOG_LEVEL": "warning", "BERTH_INSTANCE": INSTANCE, **env}
        argv = [sys.executable, str(BASE_DIR / "manage.py"), "berth_worker", host.queue_name,
                "--with-scheduler"]  # fmt: skip
        supervisor = Supervisor()
        supervisor.start("worker", argv, env=worker_env, cwd=BASE_DIR, stop_signal=signal.SIGTERM)
        self.workers.append(supervisor)
        return host

    def model(self, name: str, **shape: int) -> Any:
        from models_registry import services as registry
        from models_registry.tiny_model import write_servable_model

        write_servable_model(self.root / "team-a" / name, **shape)
        return registry.register(self.user, self.team, f"/store/team-a/{name}")

    def deploy(self, model: Any, host: Any, name: str) -> Any:
        from deployments.models import EngineImage
        from deployments.services import DeployRequest, request_deployment

        request = DeployRequest(
            team=self.team, model=model, host=host, image=EngineImage.objects.get(name="vllm-cpu"),
            name=name, gpu_count=0, engine_args={"max_model_len": 2048},
        )  # fmt: skip
        return request_deployment(self.user, request)

    def close(self) -> None:
        for supervisor in self.workers:
            supervisor.stop_all(lambda _message: None)


def until_state(deployment: Any, state: str) -> Any:
    from deployments.models import Deployment

    def reached() -> Any:
        row = Deployment.objects.get(pk=deployment.pk)
        if row.state == "failed":
            raise SystemExit(f"{row.name} failed: {row.last_error}")
        return row if row.state == state else None

    return wait_for(reached, poll_s=0.1, what=f"{deployment.name} {state}")


def berth_start(
    console: Console, deployment: Any, client: Any = None, phases: list | None = None
) -> tuple[float, float | None]:
    """Restart a stopped deployment; seconds from the request to its ``ready`` event, and the
    engine's own init time. Stops it again afterwards. With ``client``, where the time went is
    appended to ``phases`` (:func:`berth_phases`)."""
    from django.utils import timezone

    from deployments.services import request_restart, request_stop

    deployment.refresh_from_db()
    requested = timezone.now()
    request_restart(console.user, deployment)
    ready = until_state(deployment, "ready")
    event = ready.events.filter(kind="state", state="ready", generation=ready.generation).get()
    seconds = (event.time - requested).total_seconds()
    init = engine_init_s(ready.log_tail)
    if client is not None and phases is not None:
        phases.append(berth_phases(client, ready, requested.timestamp()))
    request_stop(console.user, ready)
    until_state(ready, "stopped")
    return seconds, init


def berth_phases(client: Any, deployment: Any, requested: float) -> dict[str, float]:
    """Seconds of each step from the request to ``ready``: picked up (``launching``), the launch
    work before Docker started the container, the start itself to ``loading``, the engine's own
    start (container started → "Application startup complete" in its log) and the watcher's lag
    (that line → ``ready``)."""
    events = {
        e.state: e.time.timestamp()
        for e in deployment.events.filter(kind="state", generation=deployment.generation)
    }
    container = client.containers.get(deployment.container_id)
    started, listening = container_times(container)
    return {
        "picked_up": events["launching"] - requested,
        "launch_work": started - events["launching"],
        "to_loading": events["loading"] - started,
        "engine_start": listening - started,
        "watch_lag": events["ready"] - listening,
    }


def container_times(container: Any) -> tuple[float, float]:
    """When Docker started ``container`` and when its engine logged that it listens."""
    from deployments.runtime.launcher import _docker_time

    started = _docker_time(container.attrs["State"]["StartedAt"][:26].rstrip("Z") + "Z")
    raw = container.logs(timestamps=True).decode(errors="replace")
    stamps = [line.split(" ", 1)[0] for line in raw.splitlines() if "startup complete" in line]
    return started, _docker_time(stamps[-1])


def first_start(deployment: Any) -> tuple[float, float | None]:
    """The first start of a just-requested deployment (empty cache volume), then stopped."""
    from deployments.services import request_stop

    ready = until_state(deployment, "ready")
    event = ready.events.filter(kind="state", state="ready").get()
    seconds = (event.time - ready.created).total_seconds()
    init = engine_init_s(ready.log_tail)
    request_stop(deployment.requested_by, ready)
    until_state(ready, "stopped")
    return seconds, init


def engine_init_s(lines: list[str]) -> float | None:
    found = [float(m.group(1)) for line in lines if (m := INIT_LINE.search(line))]
    return found[-1] if found else None


# --- the plain docker run ------------------------------------------------------------------------


def plain_run(client: Any, deployment: Any, number: int, phases: list | None = None) -> float:
    """``docker run`` of the container Berth would make for ``deployment`` (same cache volume);
    seconds until ``/health`` answers 200 (and its phases, like :func:`berth_phases`)."""
    from deployments.runtime import host_checks
    from deployments.runtime.launch_spec import container_kwargs
    from deployments.runtime.launcher import build_spec

    port = free_port()
    labels = host_checks.image_labels(client, deployment.image.reference)
    kwargs = container_kwargs(build_spec(deployment, [], port, labels))
    kwargs["name"] = f"{INSTANCE}-plain-{os.getpid()}-{number}"
    kwargs["restart_policy"] = {"Name": "no", "MaximumRetryCount": 0}
    started, wall = time.perf_counter(), time.time()
    container = client.containers.run(**kwargs)
    try:
        wait_for(lambda: healthy(port), what="docker run /health")
        seconds, healthy_at = time.perf_counter() - started, time.time()
        if phases is not None:
            container.reload()
            running, listening = container_times(container)
            phases.append({
                "to_started": running - wall, "engine_start": listening - running,
                "health_lag": healthy_at - listening,
            })  # fmt: skip
        return seconds
    finally:
        container.remove(force=True)


def drop_model_from_page_cache(model: Any) -> None:
    from deployments.runtime.prewarm import drop_from_page_cache

    for path in Path(model.translation().local).glob("*.safetensors"):
        drop_from_page_cache(path)


def clean_up(client: Any) -> None:
    label = f"berth.instance={INSTANCE}"
    for container in client.containers.list(all=True, filters={"label": label}):
        container.remove(force=True)
    for container in client.containers.list(all=True, filters={"name": f"{INSTANCE}-plain-"}):
        container.remove(force=True)
    for volume in client.volumes.list(filters={"name": f"{INSTANCE}-cache-"}):
        volume.remove(force=True)


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    os.environ["BERTH_INSTANCE"] = INSTANCE
    os.environ["BERTH_ENGINE_PORT_MIN"], os.environ["BERTH_ENGINE_PORT_MAX"] = PORTS
    setup_django()
    import docker
    from deployments.runtime.engine_build import existing_image, image_reference, load_recipe

    client = docker.from_env(timeout=300)
    image = image_reference(load_recipe("vllm-cpu"))
    if existing_image(client, image) is None:
        reason = f"{image} is missing: run manage.py build_engine_image vllm-cpu first"
        print(reason)
        emit_json("real_engine", {"skipped": reason})
        return
    console = None
    try:
        with throwaway_database(), tempfile.TemporaryDirectory(dir=BASE_DIR / "var") as scratch:
            console = Console(Path(scratch), image)
            results = measure(args, console, client)
    finally:
        if console is not None:
            console.close()
        clean_up(client)
        client.close()
    report(args, image, results)


def measure(args: argparse.Namespace, console: Console, client: Any) -> dict[str, Any]:
    host = console.host(f"{INSTANCE}-{os.getpid()}")
    tiny = console.deploy(console.model("tiny"), host, "tiny")
    cold_s, cold_init = first_start(tiny)
    plain, berth, warm_init, plain_phases, berth_phases_ = [], [], [], [], []
    for number in range(args.runs):  # alternating, so drift on a busy machine hits both
        plain.append(plain_run(client, tiny, number, plain_phases))
        seconds, init = berth_start(console, tiny, client, berth_phases_)
        berth.append(seconds)
        warm_init.append(init)
    results = {
        "cold_s": cold_s, "cold_init_s": cold_init, "warm_init_s": warm_init,
        "plain": plain, "berth": berth, "plain_phases": plain_phases,
        "berth_phases": berth_phases_, "prewarm_on": [], "prewarm_off": [], "checkpoint_bytes": 0,
    }  # fmt: skip
    if args.prewarm_runs > 0:
        results |= measure_prewarm(args, console)
    return results


def measure_prewarm(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Prewarm on and off, alternating, for the 1 GiB checkpoint (page cache dropped first)."""
    on_host = console.host(f"{INSTANCE}-on-{os.getpid()}", BERTH_PREWARM="on")
    off_host = console.host(f"{INSTANCE}-off-{os.getpid()}", BERTH_PREWARM="off")
    big_model = console.model("big", layers=BIG_LAYERS, hidden=1024, intermediate=4096, heads=16,
                              kv_heads=4)  # fmt: skip
    with_prewarm = console.deploy(big_model, on_host, "big-prewarm")
    first_start(with_prewarm)
    without = console.deploy(big_model, off_host, "big-plain")
    first_start(without)
    prewarm_on, prewarm_off = [], []
    for _ in range(args.prewarm_runs):
        drop_model_from_page_cache(big_model)
        prewarm_on.append(berth_start(console, with_prewarm)[0])
        drop_model_from_page_cache(big_model)
        prewarm_off.append(berth_start(console, without)[0])
    return {
        "checkpoint_bytes": big_model.weights_bytes,
        "prewarm_on": prewarm_on, "prewarm_off": prewarm_off,
    }  # fmt: skip


def report(args: argparse.Namespace, image: str, results: dict[str, Any]) -> None:
    stats = {
        "docker_run_to_healthy_s": summary(results["plain"]),
        "berth_request_to_ready_s": summary(results["berth"]),
        "warm_engine_init_s": summary([s for s in results["warm_init_s"] if s is not None]),
        "prewarm_on_request_to_ready_s": summary(results["prewarm_on"]),
        "prewarm_off_request_to_ready_s": summary(results["prewarm_off"]),
    }
    ratio = stats["berth_request_to_ready_s"]["median"] / stats["docker_run_to_healthy_s"]["median"]
    print(f"{image}; {args.runs} alternating pairs, {args.prewarm_runs} prewarm runs per mode")
    print_table(
        [(name, s["n"], s["median"], s["min"], s["max"]) for name, s in stats.items() if s["n"]]
        + [("cold first start (request -> ready)", 1, round(results["cold_s"], 2), "", ""),
           ("cold engine init", 1, results["cold_init_s"], "", "")],
        ("seconds", "n", "median", "min", "max"),
    )  # fmt: skip
    phases = {
        f"{who} {name}": summary([run[name] for run in results[f"{who}_phases"]])
        for who in ("plain", "berth")
        for name in (results[f"{who}_phases"] or [{}])[0]
    }
    print_table(
        [(name, s["n"], s["median"], s["min"], s["max"]) for name, s in phases.items()],
        ("phase seconds", "n", "median", "min", "max"),
    )
    own = {
        who: summary([sum(run[name] for name in run if name != "engine_start") for run in runs])
        for who, runs in (("plain", results["plain_phases"]), ("berth", results["berth_phases"]))
    }
    own_ratio = (
        1
        + (own["berth"]["median"] - own["plain"]["median"])
        / stats["docker_run_to_healthy_s"]["median"]
    )
    print(f"Berth / docker run (medians): {ratio:.3f}x (goal <= {RATIO_GOAL})")
    print(
        f"outside the engine's own start: Berth {own['berth']['median']:.3f} s, docker run "
        f"{own['plain']['median']:.3f} s; as a ratio of docker run's total: {own_ratio:.3f}x"
    )
    gib = results["checkpoint_bytes"] / 2**30
    prewarm = (
        [target(f"prewarm on / off ({gib:.2f} GiB)", round(
            stats["prewarm_on_request_to_ready_s"]["median"]
            / stats["prewarm_off_request_to_ready_s"]["median"], 3
        ), "record", None)]
        if results["prewarm_on"] else []
    )  # fmt: skip
    emit_json(
        "real_engine",
        {
            "image": image, "runs": args.runs, "prewarm_runs": args.prewarm_runs,
            **stats, "cold_request_to_ready_s": round(results["cold_s"], 2),
            "cold_engine_init_s": results["cold_init_s"], "checkpoint_gib": round(gib, 2),
            "berth_over_docker_ratio": round(ratio, 3), "phases_s": phases,
            "outside_engine_start_s": own, "outside_engine_start_ratio": round(own_ratio, 3),
            "targets": [
                target("Berth / docker run, request -> ready", round(ratio, 3),
                       f"<= {RATIO_GOAL}", ratio <= RATIO_GOAL),
                target("Berth / docker run, outside the engine's own start",
                       round(own_ratio, 3), "record", None),
                target("cold / warm engine init", round(
                    (results["cold_init_s"] or 0) / (stats["warm_engine_init_s"]["median"] or 1), 2
                ), "record", None),
                *prewarm,
            ],
        },
    )  # fmt: skip


if __name__ == "__main__":
    main()
