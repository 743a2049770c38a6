"""Findings 4 and 5 of the attack on a running console (issue 15): faults of the processes and of
Redis, with real agents, a real RQ worker, real Docker and the stand-in engine (not vLLM).

4. A worker SIGKILLed mid-launch left the deployment ``launching`` (its job "started") for about
   20 minutes: now a started job whose worker stopped beating is lost and runs again.
5. After a Redis restart (data lost) no watcher ran for up to 10 minutes and periodic jobs were
   not booked again: now the agent moves scheduled jobs from a thread that survives the outage,
   reconcile re-books a lost or overdue watcher, and every periodic job is due again.

Intervals are shortened (agent 2 s, reconcile 5 s) so each case takes seconds; each test writes
the convergence time it measured to ``artifacts/fault-convergence.json``. With the defaults
(agent 15 s, reconcile 60 s) the bounds are 3 agent intervals + one reconcile interval + the
launch itself: under two minutes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job

from accounts.models import Role, Team, User
from audit.models import AuditEvent
from core import naming, queues
from deployments.models import Deployment, EngineImage
from deployments.services import DeployRequest, request_deployment
from deployments.states import State
from tests.conftest import BASE_DIR, subprocess_env, which_or_skip
from tests.deployment_builders import host_with_gpus, registered_model, remove_engines
from tests.model_dirs import write_model

pytestmark = [pytest.mark.docker, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

FAST = {
    "BERTH_AGENT_INTERVAL_S": "2",
    "BERTH_RECONCILE_INTERVAL_S": "5",
    "BERTH_MONITOR_INTERVAL_S": "0.5",
}
SOURCES = "nvml,nvidia-smi-csv,nvidia-smi-xml"  # no image pull for nvidia-smi in a container
CONVERGE_WITHIN_S = 60  # the fast intervals' bound: 3 x 2 s silent + 5 s reconcile + launch
# The verification is first due a minute after an agent starts, then daily: booked again this
# soon after Redis comes back, it was restored, not merely due.
RESTORED_WITHIN_S = 20
ARTIFACT = BASE_DIR / "artifacts" / "fault-convergence.json"


def _record(case: str, seconds: float) -> None:
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    figures = json.loads(ARTIFACT.read_text()) if ARTIFACT.exists() else {}
    figures[case] = {"seconds": round(seconds, 1), "intervals": FAST}
    ARTIFACT.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")


class Process:
    """A ``manage.py`` child in its own process group (so SIGKILL takes its children too)."""

    def __init__(self, *args: str, env: dict[str, str], log: Path):
        self.log = log
        self.handle = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, str(BASE_DIR / "manage.py"), *args],
            env=env,
            cwd=BASE_DIR,
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL the process, its group and its children: RQ's work horse puts itself in a
        process group of its own, and a killed worker's horse must not finish the job."""
        children = _descendants(self.process.pid)
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.handle.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.handle.close()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, read from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def _until(predicate: Callable[[], bool], timeout_s: float, what: str, log: Path) -> float:
    """Poll ``predicate``; the seconds it took. Fails with the processes' log."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
    raise AssertionError(f"{what}: not within {timeout_s} s\n{tail}")


@pytest.fixture
def world(tmp_path: Path, engine_image: str, docker_client: Any) -> Iterator[dict[str, Any]]:
    """A host, team A's tiny model and the stand-in engine on the allow-list; whatever engines
    the test started are removed afterwards."""
    team = Team.objects.create(slug="team-a", name="Team A")
    admin = User.objects.create_user("ops", password="x" * 16, role=Role.ADMIN)
    write_model(tmp_path / "models" / "team-a" / "tiny")
    model = registered_model(team, tmp_path / "models", "tiny")
    host = host_with_gpus(name="fault-host", count=1)
    image = EngineImage.objects.create(
        name="stand-in",
        reference=engine_image,
        gpu_capable=False,
        cpu_capable=True,
        is_stand_in=True,
        health_command=["curl", "-fsS", "http://127.0.0.1:8000/health"],
        environment={"ENGINE_LOAD_SECONDS": "4"},
    )
    yield {"team": team, "admin": admin, "model": model, "host": host, "image": image}
    remove_engines(docker_client, Deployment.objects.all())


def _agent_args(world: dict[str, Any]) -> list[str]:
    return ["berth_agent", "--host", world["host"].name, "--sources", SOURCES]


def _deploy(world: dict[str, Any], name: str) -> Deployment:
    return request_deployment(
        world["admin"],
        DeployRequest(
            team=world["team"],
            model=world["model"],
            host=world["host"],
            image=world["image"],
            name=name,
            gpu_count=0,
        ),
    )


def _state(deployment: Deployment) -> str:
    return Deployment.objects.values_list("state", flat=True).get(pk=deployment.pk)


def _launch_started(deployment: Deployment, redis: Redis) -> bool:
    try:
        job = Job.fetch(naming.deployment_job_id("launch", deployment.pk, 1), connection=redis)
    except NoSuchJobError:
        return False
    return job.get_status() == "started" and _state(deployment) == State.LAUNCHING


def _kill_mid_launch(
    world: dict[str, Any], start: Callable[[], Process], redis: Redis, log: Path
) -> tuple[Deployment, float]:
    """Deploy, wait for the launch job to be running, SIGKILL its worker; a few tries, since a
    launch of the stand-in takes about a second. Returns the deployment and the kill's time."""
    for attempt in range(5):
        process = start()
        deployment = _deploy(world, f"tiny-{attempt}")
        _until(lambda d=deployment: _launch_started(d, redis), 60, "the launch starting", log)
        process.kill()
        killed_at = time.monotonic()
        if _state(deployment) == State.LAUNCHING:
            return deployment, killed_at
    raise AssertionError("every launch finished before the kill landed")


def test_finding_04_an_agent_killed_mid_launch_converges_after_its_restart(
    world: dict[str, Any], redis_client: Redis, tmp_path: Path
) -> None:
    env = subprocess_env(**FAST)
    log = tmp_path / "agent.log"
    agent = _agent_args(world)
    deployment, _killed = _kill_mid_launch(
        world, lambda: Process(*agent, env=env, log=log), redis_client, log
    )
    restarted = Process(*agent, env=env, log=log)
    try:
        took = _until(
            lambda: _state(deployment) in (State.LOADING, State.READY),
            CONVERGE_WITHIN_S,
            "the launch running again after the agent's restart",
            log,
        )
        _until(lambda: _state(deployment) == State.READY, 60, "the engine ready", log)
    finally:
        restarted.stop()
    _record("04-agent-sigkill-then-restart", took)
    resumed = AuditEvent.objects.filter(
        action="reconcile.job_resumed", target_id=str(deployment.pk)
    )
    assert resumed.exists()
    assert "has not beaten" in resumed.first().payload["why"]


def test_finding_04_a_worker_killed_mid_launch_converges_without_a_restart(
    world: dict[str, Any], redis_client: Redis, tmp_path: Path
) -> None:
    """A separate ``berth_worker`` on the host's queue dies mid-launch; the host's agent runs
    on (it is started right after the kill: while both wait on the queue, either could have
    taken the launch). Converged is measured from the kill."""
    env = subprocess_env(**FAST)
    log = tmp_path / "worker.log"
    queue = world["host"].queue_name
    deployment, killed_at = _kill_mid_launch(
        world, lambda: Process("berth_worker", queue, env=env, log=log), redis_client, log
    )
    agent = Process(
        "berth_agent", "--host", world["host"].name, "--sources", SOURCES, env=env, log=log
    )
    try:
        _until(
            lambda: _state(deployment) in (State.LOADING, State.READY),
            CONVERGE_WITHIN_S,
            "the launch running again on the agent",
            log,
        )
        took = time.monotonic() - killed_at
        _until(lambda: _state(deployment) == State.READY, 60, "the engine ready", log)
    finally:
        agent.stop()
    _record("04-worker-sigkill-agent-up", took)
    assert took < CONVERGE_WITHIN_S


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server of this test's own, without persistence: a restart loses everything."""

    def __init__(self, port: int, log: Path):
        self.port, self.log = port, log
        self.binary = which_or_skip("redis-server")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.handle = self.log.open("ab")
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--save", "", "--appendonly", "no"],
            stdout=self.handle,
            stderr=subprocess.STDOUT,
        )
        client = Redis(port=self.port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return
            except OSError:
                time.sleep(0.05)
            except Exception:  # redis' ConnectionError while it starts
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.handle.close()


def test_finding_05_after_redis_loses_its_data_watchers_and_periodic_jobs_come_back(
    world: dict[str, Any], tmp_path: Path, settings: Any
) -> None:
    log = tmp_path / "faults.log"
    server = RedisServer(_free_port(), log)
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    env = subprocess_env(REDIS_URL=url, **{**FAST, "BERTH_MONITOR_INTERVAL_S": "0.5"})
    image = world["image"]
    image.environment = {"ENGINE_LOAD_SECONDS": "20"}  # still loading when Redis goes
    image.save()
    agent = Process(
        "berth_agent", "--host", world["host"].name, "--sources", SOURCES, env=env, log=log
    )
    try:
        settings.REDIS_URL = url
        queues.redis_connection.cache_clear()
        deployment = _deploy(world, "tiny")
        _until(lambda: _state(deployment) == State.LOADING, 60, "loading", log)
        server.kill()
        time.sleep(3)
        server.start()  # empty: every queued, scheduled and claimed job is gone
        back = time.monotonic()
        fresh = Redis.from_url(url)
        _until(
            lambda: _verification_booked(fresh),
            RESTORED_WITHIN_S,
            "the daily audit verification booked again",
            log,
        )
        periodic = time.monotonic() - back
        resumed = AuditEvent.objects.filter(
            action="reconcile.job_resumed", target_id=str(deployment.pk)
        )
        _until(resumed.exists, CONVERGE_WITHIN_S, "the lost watcher booked again", log)
        watcher = time.monotonic() - back
        _until(
            lambda: _state(deployment) == State.READY,
            CONVERGE_WITHIN_S + 20,
            "the watcher running again: the engine ready",
            log,
        )
        ready = time.monotonic() - back
    finally:
        agent.stop()
        server.kill()
        settings.REDIS_URL = settings.RQ_QUEUES["default"]["URL"]
        queues.redis_connection.cache_clear()
    _record("05-redis-data-lost-verification-booked-again", periodic)
    _record("05-redis-data-lost-watcher-booked-again", watcher)
    _record("05-redis-data-lost-engine-ready", ready)
    assert "no run of it in Redis" in resumed.first().payload["why"]


def _verification_booked(redis: Redis) -> bool:
    """The console's daily chain verification is on the default queue again (only an agent's
    tick puts it there; nothing runs the default queue in this test)."""
    for job_id in redis.lrange("rq:queue:default", 0, -1):
        try:
            job = Job.fetch(job_id.decode(), connection=redis)
        except NoSuchJobError:
            continue
        if job.func_name == "audit.jobs.scheduled_verification":
            return True
    return False
