"""Scaling on the real CPU engine (vLLM 0.32 for CPUs, the tiny model): what scale to zero
costs the first request, how fast the scaler follows a step in load, and what following demand
saves on a recorded bursty trace.

1. **Time to first token from idle**: an autoscaled deployment (minimum 0) goes idle; a streamed
   request through the real gateway wakes it (a new container on its kept compile cache volume,
   the model's files still in the page cache) — against the same deployment woken the same way
   without Berth's levers: its compile cache volume removed and the model's files dropped from
   the page cache first (``posix_fadvise(DONTNEED)``), i.e. a cold ``docker run``-like start.
2. **Reaction to a step in load**: one replica (``--max-num-seqs 2``, target 1 waiting per
   replica, up window 10 s, the scaler looking every second); six clients start at once, each
   sending 400-token streams back to back: seconds to the scale-up decision, and to the second
   replica ready (its compile cache seeded from the first's).
3. **A recorded bursty trace** (``tests/fixtures/scaling/vllm_cpu_bursty.json``: the client
   phases of a recording from this engine), replayed in a simulation through the real
   ``decide()`` looking every second: the recorded clients (up to 16, each sending its next
   request when answered), each replica running 2 requests at once as the engine of (2) does,
   each taking the service time measured there, a new replica serving after the wake time
   measured in (1); replica-minutes, requests served and requests that waited longer than 10 s,
   autoscaled (1-4 replicas; 0-4 with idle after 60 s) against a fixed 4. Simulated because on
   this 2-core machine a second engine adds no compute: the figures are the scaler's, on this
   engine's measured speeds.

::

    .venv/bin/python benchmarks/scaling.py [--runs 1] [--quick]

Needs Docker and the image (it says how to build it). Prints a table and one JSON line; every
container, volume and file it made is removed at the end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import threading
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
    throwaway_database,
)
from benchmarks.real_engine import (
    INSTANCE,
    PORTS,
    Console,
    clean_up,
    drop_model_from_page_cache,
    free_port,
    until_state,
    wait_for,
)

TRACE = BASE_DIR / "tests" / "fixtures" / "scaling" / "vllm_cpu_bursty.json"
MAX_NUM_SEQS = 2  # the benchmark's engine (--max-num-seqs 2), as measured in part 2
WAIT_LIMIT_S = 10.0
LOOK_S = 1.0
# The step's requests: long enough that the engine's own queue holds the four it cannot run
# (the tiny model writes a 48-token answer faster than a client sends the next request).
STEP_TOKENS = 400


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="wakes with and without the levers")
    parser.add_argument("--quick", action="store_true", help="one run of each (the default)")
    return parser.parse_args()


class Looker(threading.Thread):
    """What the host's agent does meanwhile: its heartbeat (placement takes only hosts whose
    agent is alive) and the scaler's periodic look, every second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stopping = threading.Event()
        self.hosts: list[Any] = []

    def run(self) -> None:
        from django.db import connection

        from deployments.scaling import scaler
        from gpus.inventory import heartbeat

        while not self.stopping.wait(LOOK_S):
            try:
                for host in self.hosts:
                    heartbeat(host)
                scaler.tick()
            finally:
                connection.close()


class Gateway:
    """``manage.py berth_gateway`` on the benchmark's database, on a free port."""

    def __init__(self) -> None:
        from django.db import connection

        from config.processes import Supervisor, child_environment

        self.port = free_port()
        env = child_environment(DATABASE_URL=f"sqlite:///{connection.settings_dict['NAME']}")
        env |= {"LOG_LEVEL": "warning", "BERTH_INSTANCE": INSTANCE, "BERTH_GATEWAY_HOLD_S": "600"}
        argv = [sys.executable, str(BASE_DIR / "manage.py"), "berth_gateway", "--port",
                str(self.port)]  # fmt: skip
        self.supervisor = Supervisor()
        self.supervisor.start("gateway", argv, env=env, cwd=BASE_DIR, stop_signal=signal.SIGTERM)
        wait_for(self.healthy, deadline_s=60, what="the gateway")

    def healthy(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            connection.request("GET", "/healthz")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def stream(self, key: str, tokens: int) -> dict[str, float]:
        """One streamed completion: seconds to the first token and to the end."""
        started = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=900)
        body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": tokens,
                "min_tokens": tokens, "stream": True}  # fmt: skip
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        connection.request("POST", "/v1/completions", json.dumps(body), headers)
        response = connection.getresponse()
        if response.status != 200:
            raise SystemExit(f"the gateway answered {response.status}: {response.read()[:300]!r}")
        first = None
        for line in response:
            if first is None and line.startswith(b"data: {"):
                first = time.perf_counter() - started
        connection.close()
        return {"ttft_s": first or math.nan, "total_s": time.perf_counter() - started}

    def close(self) -> None:
        self.supervisor.stop_all(lambda _message: None)


def autoscaled(console: Console, host: Any, **policy: Any) -> Any:
    from deployments.models import EngineImage
    from deployments.scaling.policy import PolicyChange, set_policy
    from deployments.services import DeployRequest, request_deployment

    model = console.model("tiny")
    request = DeployRequest(
        team=console.team, model=model, host=host, image=EngineImage.objects.get(name="vllm-cpu"),
        name="tiny", gpu_count=0, engine_args={"max_model_len": 2048, "max_num_seqs": 2},
    )  # fmt: skip
    deployment = request_deployment(console.user, request)
    set_policy(console.user, deployment, PolicyChange(autoscale=True, **policy))
    return deployment


def wake_ttft(gateway: Gateway, key: str, deployment: Any, *, levers: bool) -> dict[str, float]:
    """Wait until idle, optionally take Berth's levers away, and time a waking request."""
    from django.conf import settings

    import docker
    from core import naming

    idle = until_state(deployment, "idle")
    if not levers:
        client = docker.from_env(timeout=120)
        client.volumes.get(naming.cache_volume(idle.pk, settings.BERTH_INSTANCE)).remove(force=True)
        client.close()
        drop_model_from_page_cache(idle.model)
    result = gateway.stream(key, 16)
    woken = until_state(deployment, "ready")
    result["request_to_ready_s"] = (woken.ready_at - woken.woken_at).total_seconds()
    return result


def load_step(gateway: Gateway, key: str, deployment: Any) -> dict[str, Any]:
    """Six clients at once on one replica: seconds to the scale-up decision and to the second
    replica ready; the requests' service time at a full batch."""
    from audit.actions import Action
    from audit.models import AuditEvent
    from deployments.models import Deployment

    stop = threading.Event()
    latencies: list[float] = []

    def client() -> None:
        while not stop.is_set():
            try:
                latencies.append(gateway.stream(key, STEP_TOKENS)["total_s"])
            except (OSError, SystemExit):  # the gateway went away: the run is ending
                return

    step_at = time.time()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for thread in threads:
        thread.start()
    decided = wait_for(
        lambda: (
            AuditEvent.objects.filter(action=Action.DEPLOYMENT_SCALED, time__gt=_dt(step_at))
            .order_by("seq")
            .first()
        ),
        deadline_s=300,
        poll_s=0.2,
        what="the scale-up decision",
    )
    second = wait_for(
        lambda: Deployment.objects.filter(replica_of=deployment, replica_index=1).first(),
        deadline_s=60,
        what="the second replica",
    )
    # The decision is the figure; the load then ends, as in tests/test_scaling_vllm.py: on this
    # 2-core machine both engines are pinned to core 0 (vLLM's CPU binding), and a start under
    # a saturating load (other sessions' suites too) can outlast the 300 s stall timer.
    stop.set()
    for thread in threads:
        thread.join(timeout=600)
    result = {
        "decision_s": decided.time.timestamp() - step_at,
        "decision": json.loads(decided.payload_json),
        # A request's own run time at a full batch (two running): the shortest one seen.
        "service_s": min(latencies) if latencies else math.nan,
        "requests": len(latencies),
    }
    try:
        ready = until_state(second, "ready")
    except SystemExit as exc:
        result["second_ready_s"] = math.nan
        result["second_error"] = str(exc)
    else:
        result["second_ready_s"] = ready.ready_at.timestamp() - step_at
    return result


def _dt(unix: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(unix, tz=UTC)


# --- the recorded trace, simulated ---------------------------------------------------------------


def simulate(policy: Any, service_s: float, start_s: float, *, fixed: int | None) -> dict:
    """Replay the trace's client phases through ``decide()`` looking every second, or with
    ``fixed`` replicas always on. Closed loop, as recorded: each active client sends its next
    request when the last one is answered; each replica runs up to 4 at once."""
    from deployments.scaling.decide import Load, Memory, ReplicaLoad, decide

    phases = [(float(s), int(c)) for s, c in json.loads(TRACE.read_text())["phases"]]
    end, step = sum(seconds for seconds, _ in phases), 0.1
    clients = max(c for _, c in phases)
    busy_until = [0.0] * clients  # when each client's request ends (inf: still waiting)
    queue: list[tuple[float, int]] = []  # (arrival, client)
    running: list[tuple[float, int]] = []  # (finish, client)
    waited: list[float] = []
    desired = serving = fixed or 1
    starting: list[float] = []  # when each replica on its way starts serving
    memory, last_request, replica_seconds = Memory(), None, 0.0
    t, next_look = 0.0, 0.0
    while t < end:
        active = _clients_at(phases, t)
        running = [(f, c) for f, c in running if f > t]
        for c in range(active):
            if busy_until[c] <= t:
                queue.append((t, c))
                busy_until[c], last_request = math.inf, t
        serving += sum(1 for s in starting if s <= t)
        starting = [s for s in starting if s > t]
        while queue and len(running) < serving * MAX_NUM_SEQS:
            arrived, c = queue.pop(0)
            waited.append(t - arrived)
            running.append((t + service_s, c))
            busy_until[c] = t + service_s
        replica_seconds += (serving + len(starting)) * step
        if fixed is None and t >= next_look:
            next_look = t + LOOK_S
            each = len(running) / max(serving, 1)
            loads = tuple(
                ReplicaLoad(i, "ready", len(queue) / serving, each, 0.0) for i in range(serving)
            ) + tuple(ReplicaLoad(99, "loading") for _ in starting)
            queued = len(queue) if not serving else 0  # held at the gateway while idle
            decision = decide(policy, desired, Load(loads, queued, last_request), t, memory)
            memory = decision.memory
            if decision.desired > desired:
                starting += [t + start_s] * (decision.desired - desired)
            elif decision.desired < desired:
                serving -= desired - decision.desired  # drained: its requests finish
            desired = decision.desired
        t = round(t + step, 3)
    return {
        "replica_minutes": round(replica_seconds / 60, 1),
        "requests": len(waited),
        "waited_over_10s": sum(1 for w in waited if w > WAIT_LIMIT_S),
        "wait_p95_s": round(sorted(waited)[int(len(waited) * 0.95)] if waited else 0.0, 1),
    }


def _clients_at(phases: list[tuple[float, int]], t: float) -> int:
    start = 0.0
    for seconds, clients in phases:
        if t < start + seconds:
            return clients
        start += seconds
    return 0


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
        emit_json("scaling", {"skipped": reason})
        return
    console = gateway = looker = None
    try:
        with throwaway_database(), tempfile.TemporaryDirectory(dir=BASE_DIR / "var") as scratch:
            console = Console(Path(scratch), image)
            gateway = Gateway()
            looker = Looker()
            results = measure(args, console, gateway, looker)
    finally:
        if looker is not None:
            looker.stopping.set()
        if gateway is not None:
            gateway.close()
        if console is not None:
            console.close()
        clean_up(client)
        client.close()
    report(results)


def measure(args: argparse.Namespace, console: Console, gateway: Gateway, looker: Any) -> dict:
    from accounts.keys import KeySettings, create_api_key

    key = create_api_key(console.team, KeySettings("bench"))[1]
    from gpus.models import Host

    host = console.host(f"{INSTANCE}-{os.getpid()}", BERTH_SCALE_DRAIN_TIMEOUT_S="60")
    Host.objects.filter(pk=host.pk).update(status="online")  # as its agent's collector says
    tiny = autoscaled(
        console, host, min_replicas=0, max_replicas=2, target_waiting=1, scale_up_window_s=10,
        scale_down_window_s=20, idle_after_s=5,
    )  # fmt: skip
    looker.hosts.append(host)
    looker.start()
    until_state(tiny, "ready")  # the first start fills the compile cache
    with_levers, without = [], []
    for _ in range(max(args.runs, 1)):
        with_levers.append(wake_ttft(gateway, key, tiny, levers=True))
        without.append(wake_ttft(gateway, key, tiny, levers=False))
    from deployments.scaling.policy import PolicyChange, set_policy

    until_state(tiny, "ready")
    tiny.refresh_from_db()
    change = PolicyChange.of(tiny).__dict__ | {"min_replicas": 1, "idle_after_s": 3600}
    set_policy(console.user, tiny, PolicyChange(**change))
    step = load_step(gateway, key, tiny)
    return {"with_levers": with_levers, "without": without, "step": step}


def report(results: dict[str, Any]) -> None:
    from deployments.scaling.decide import Policy

    warm = [r["ttft_s"] for r in results["with_levers"]]
    cold = [r["ttft_s"] for r in results["without"]]
    step = results["step"]
    wake_s = statistics.median(r["request_to_ready_s"] for r in results["with_levers"])
    service_s = step["service_s"]
    policies = {
        "autoscaled 1-4": Policy(1, 4, 1.0, 0.8, 10, 30, 900),
        "autoscaled 0-4 (idle after 60 s)": Policy(0, 4, 1.0, 0.8, 10, 30, 60),
    }
    traces = {name: simulate(p, service_s, wake_s, fixed=None) for name, p in policies.items()}
    traces["fixed 4"] = simulate(None, service_s, wake_s, fixed=4)
    print_table(
        [
            ("TTFT from idle, Berth (kept cache, page cache)", summary(warm)["median"]),
            ("TTFT from idle, no levers (cold cache, files dropped)", summary(cold)["median"]),
            ("scale-up decision after a load step", round(step["decision_s"], 1)),
            (
                "second replica ready after the step (load ended at the decision)",
                round(step["second_ready_s"], 1),
            ),
            ("request service time at a full batch", round(service_s, 2)),
        ],
        ("seconds", "median"),
    )
    print_table(
        [
            (name, r["replica_minutes"], r["requests"], r["waited_over_10s"], r["wait_p95_s"])
            for name, r in traces.items()
        ],
        ("recorded bursty trace", "replica-min", "requests", "waited > 10 s", "wait p95 s"),
    )
    emit_json(
        "scaling",
        {
            "ttft_from_idle_s": summary(warm),
            "ttft_cold_without_levers_s": summary(cold),
            "wake_request_to_ready_s": wake_s,
            "load_step": {k: v for k, v in step.items() if k != "decision"},
            "load_step_decision": step["decision"].get("why"),
            "trace": traces,
        },
    )


if __name__ == "__main__":
    main()
