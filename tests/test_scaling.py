"""Scale to zero and wake on request, end to end: the real gateway process, a real worker on the
host's queue, real engine containers (the stand-in, allow-listed here as a CPU engine that is
planned like the real one, so each replica holds a real host-memory reservation), the scaler's
look (``scaler.tick``, what the agent's periodic job runs) called by the test.

The burst that scales 1 → 2 and back with streams open needs an engine that queues and streams
for real: ``tests/test_scaling_vllm.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client

from accounts.keys import KeySettings, create_api_key
from accounts.models import Team, User
from audit.actions import Action
from audit.models import AuditEvent
from config.metrics import render_metrics
from core import naming
from deployments import services
from deployments.models import Deployment, EngineImage
from deployments.runtime import host_memory
from deployments.scaling import actions, scaler
from deployments.scaling.policy import PolicyChange, set_policy
from deployments.states import State
from deployments.validation import DeployRequest
from gpus.host_resources import read_host_resources
from gpus.hosts import register_host
from gpus.inventory import heartbeat
from gpus.models import Host
from models_registry import services as registry
from models_registry.models import StorageMount
from models_registry.tiny_model import write_servable_model
from tests.conftest import BASE_DIR, subprocess_env
from tests.deployment_builders import remove_engines
from tests.gateway_process import METRICS_TOKEN, GatewayProcess

pytestmark = [
    pytest.mark.redis,
    pytest.mark.docker,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(300),
]
DEADLINE_S = 90
LABELS = '{deployment="tiny",team="team-a"}'  # the console's metrics of team A's tiny


def wait_until(check: Callable[[], Any], *, deadline_s: float = DEADLINE_S, what: str = "") -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after the deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"not within {deadline_s} s: {what}")


def audited(action: Action, **payload: Any) -> list[AuditEvent]:
    """The audit events of ``action`` whose payload holds ``payload``."""
    events = AuditEvent.objects.filter(action=action).order_by("seq")
    return [e for e in events if all(e.payload.get(k) == v for k, v in payload.items())]


def state_of(deployment: Deployment) -> str:
    deployment.refresh_from_db()
    assert deployment.state != State.FAILED, (deployment.last_error, deployment.log_tail[-5:])
    return deployment.state


class Fleet:
    """One CPU host on this machine's Docker engine with its worker, a tiny model, the engine
    on the allow-list, a gateway and a key of the team."""

    def __init__(self, team: Team, member: User, root: Path, engine_image: str) -> None:
        self.team, self.member = team, member
        self.host: Host = register_host(f"cpu-{uuid.uuid4().hex[:6]}")[0]
        heartbeat(self.host, resources=read_host_resources())
        Host.objects.filter(pk=self.host.pk).update(status="online")
        self.host.refresh_from_db()
        StorageMount.objects.create(
            name="store", canonical_prefix="/store", local_path=str(root),
            host_path=str(root), container_path="/models",
        )  # fmt: skip
        write_servable_model(root / team.slug / "tiny")
        self.model = registry.register(member, team, f"/store/{team.slug}/tiny")
        # Not marked as the stand-in: it is planned like a real CPU engine and holds memory.
        self.image = EngineImage.objects.create(
            name="cpu-engine", reference=engine_image, gpu_capable=False, cpu_capable=True,
            health_command=["curl", "-fsS", "http://127.0.0.1:8000/health"],
            environment={"ENGINE_LOAD_SECONDS": "1"},
        )  # fmt: skip
        self.worker = subprocess.Popen(
            [sys.executable, str(BASE_DIR / "manage.py"), "berth_worker",
             self.host.queue_name, "--with-scheduler"],
            env=subprocess_env(BERTH_MONITOR_INTERVAL_S="0.5", BERTH_SCALE_DRAIN_TIMEOUT_S="30"),
            cwd=BASE_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.gateway = GatewayProcess(BERTH_GATEWAY_HOLD_S="60")
        self.key = create_api_key(team, KeySettings("scaling tests"))[1]

    def deploy(self, name: str, **policy: Any) -> Deployment:
        request = DeployRequest(
            team=self.team, model=self.model, host=self.host, image=self.image, name=name,
            gpu_count=0,
        )  # fmt: skip
        deployment = services.request_deployment(self.member, request)
        if policy:
            change = PolicyChange(autoscale=True, **policy)
            set_policy(self.member, deployment, change)
        deployment.refresh_from_db()
        return deployment

    def chat(self, model: str) -> tuple[int, dict]:
        status, _, body = self.gateway.chat(self.key, model, max_tokens=4)
        return status, json.loads(body)

    def close(self, docker_client: Any) -> None:
        self.gateway.stop()
        self.worker.terminate()
        self.worker.wait(timeout=30)
        remove_engines(docker_client, Deployment.objects.all())


@pytest.fixture
def fleet(
    team_a: Team, alice: User, tmp_path: Path, docker_client: Any, engine_image: str
) -> Iterator[Fleet]:
    """A host with its worker, the engine allowed as a CPU engine, a gateway and team A's key;
    every container and volume made is removed afterwards."""
    setup = Fleet(team_a, alice, tmp_path, engine_image)
    try:
        yield setup
    finally:
        setup.close(docker_client)


def tick_until(deployment: Deployment, state: State, *, what: str) -> None:
    """Let the scaler look (as the agent's periodic job does) until ``deployment`` is in
    ``state``."""

    def look() -> bool:
        scaler.tick()
        return state_of(deployment) == state

    wait_until(look, what=what)


def test_idle_goes_to_zero_releasing_its_memory_and_the_first_request_wakes_it(
    fleet: Fleet, docker_client: Any
) -> None:
    tiny = fleet.deploy(
        "tiny", min_replicas=0, max_replicas=1, idle_after_s=2, scale_up_window_s=0,
        scale_down_window_s=1,
    )  # fmt: skip
    assert tiny.host_memory_bytes > 0  # a CPU plan: the container's memory limit is held
    wait_until(lambda: state_of(tiny) == State.READY, what="the first start")
    assert fleet.chat("tiny")[0] == 200
    held = host_memory.reserved_bytes(fleet.host)
    assert held == tiny.host_memory_bytes

    tick_until(tiny, State.IDLE, what="idle after 2 s without a request")
    assert host_memory.reserved_bytes(fleet.host) == 0
    assert host_memory.team_reserved_bytes(fleet.team.pk) == 0
    assert docker_client.containers.list(all=True, filters={"name": tiny.container_name}) == []
    volume = naming.cache_volume(tiny.pk, settings.BERTH_INSTANCE)
    assert docker_client.volumes.get(volume)  # the compile cache stays for the wake
    decided = tiny.events.filter(data__scaling="idle").get()
    assert decided.message.startswith("scaler: 1 → 0 replicas (idle: no request for")
    assert decided.data["figures"]["quiet_s"] >= 2
    (scaled,) = audited(Action.DEPLOYMENT_SCALED, new=0)
    assert scaled.payload["figures"]["running"] == 0
    states = list(tiny.events.filter(kind="state").values_list("state", flat=True))
    assert states[-2:] == [State.STOPPING, State.IDLE]
    _, _, body = fleet.gateway.request("GET", "/v1/models", key=fleet.key)
    assert [m["id"] for m in json.loads(body)["data"]] == ["tiny"]  # idle still answers
    assert (
        "berth_scaling_idle" + '{deployment="tiny",team="team-a"} 1.0' in render_metrics().decode()
    )
    client = Client()
    client.force_login(fleet.member)
    dashboard = client.get("/").content.decode()
    assert "scaled to zero" in dashboard
    panel = client.get(f"/deployments/{tiny.public_id}/scaling/").content.decode()
    assert "<polyline" in panel  # replicas over time against load, from the scaler's samples
    assert "<strong>Idle</strong>" in panel

    # The first request wakes it and is held until a replica is ready; one sent meanwhile
    # waits behind it. Both are answered.
    answers: list[tuple[int, dict]] = []
    first = threading.Thread(target=lambda: answers.append(fleet.chat("tiny")))
    first.start()
    wait_until(lambda: state_of(tiny) != State.IDLE, what="the wake")
    second = threading.Thread(target=lambda: answers.append(fleet.chat("tiny")))
    second.start()
    first.join(timeout=DEADLINE_S)
    second.join(timeout=DEADLINE_S)
    assert [status for status, _ in answers] == [200, 200], answers
    tiny.refresh_from_db()
    assert tiny.state == State.READY
    assert tiny.generation == 2
    assert tiny.woken_at is not None
    assert tiny.ready_at > tiny.woken_at
    assert host_memory.reserved_bytes(fleet.host) == tiny.host_memory_bytes
    (woke,) = audited(Action.DEPLOYMENT_SCALED, decision="wake")
    assert "a request for tiny at the gateway" in woke.payload["why"]
    metrics = fleet.gateway.request("GET", "/metrics", key=METRICS_TOKEN)[2].decode()
    assert "berth_gateway_wake_seconds_count 1.0" in metrics
    console = render_metrics().decode()
    assert f"berth_scaling_desired_replicas{LABELS} 1.0" in console
    assert f"berth_scaling_ready_replicas{LABELS} 1.0" in console
    assert f"berth_scaling_idle{LABELS} 0.0" in console
    wake_s = (tiny.ready_at - tiny.woken_at).total_seconds()
    assert f"berth_scaling_last_wake_seconds{LABELS} {wake_s}" in console


def test_a_wake_the_team_quota_blocks_is_answered_shown_and_audited(
    fleet: Fleet, docker_client: Any
) -> None:
    tiny = fleet.deploy(
        "tiny", min_replicas=0, max_replicas=1, idle_after_s=1, scale_up_window_s=0,
        scale_down_window_s=1,
    )  # fmt: skip
    gib = -(-tiny.host_memory_bytes // host_memory.GIB)
    Team.objects.filter(pk=fleet.team.pk).update(host_memory_quota_gib=gib)  # room for one
    wait_until(lambda: state_of(tiny) == State.READY, what="the first start")
    tick_until(tiny, State.IDLE, what="idle after 1 s without a request")
    hog = fleet.deploy("hog")  # the team's quota is now held by another deployment

    status, answer = fleet.chat("tiny")
    assert status == 503
    error = answer["error"]
    assert error["code"] == "model_not_ready"
    assert "cannot wake" in error["message"]
    assert "quota exceeded" in error["message"]
    tiny.refresh_from_db()
    assert tiny.state == State.IDLE
    assert "quota exceeded" in tiny.scaling_blocked
    (blocked,) = audited(Action.DEPLOYMENT_SCALE_BLOCKED)
    assert blocked.outcome == "denied"
    assert "quota exceeded" in blocked.payload["reason"]
    assert tiny.events.filter(message__startswith="scale-up blocked: cannot wake").exists()
    client = Client()
    client.force_login(fleet.member)
    page = client.get(f"/deployments/{tiny.public_id}/scaling/").content.decode()
    assert "Scale-up blocked" in page
    assert "quota exceeded" in page

    # Once the other deployment stops, the next request wakes it.
    wait_until(lambda: state_of(hog) == State.READY, what="the other deployment's start")
    services.request_stop(fleet.member, hog)
    wait_until(lambda: state_of(hog) == State.STOPPED, what="the other deployment's stop")
    assert fleet.chat("tiny")[0] == 200
    tiny.refresh_from_db()
    assert tiny.scaling_blocked == ""


def test_a_new_replica_starts_from_a_siblings_compile_cache_on_its_host(
    fleet: Fleet, docker_client: Any, engine_image: str
) -> None:
    tiny = fleet.deploy("tiny", min_replicas=1, max_replicas=2)
    wait_until(lambda: state_of(tiny) == State.READY, what="the first start")
    source = naming.cache_volume(tiny.pk, settings.BERTH_INSTANCE)
    write = "mkdir -p /c/inductor && echo x > /c/inductor/kernel"  # a compiled artifact
    docker_client.containers.run(
        engine_image, entrypoint=["sh"], command=["-c", write],
        volumes={source: {"bind": "/c", "mode": "rw"}}, remove=True,
    )  # fmt: skip
    second = actions.add_replica(tiny, "test")
    wait_until(lambda: state_of(second) == State.READY, what="the second replica")
    seeded = second.events.get(message__startswith="compile cache seeded from replica 1's")
    assert seeded.data["source_volume"] == source
    container = docker_client.containers.get(second.container_name)
    listing = container.exec_run(["cat", "/berth-cache/inductor/kernel"]).output
    assert listing == b"x\n"
