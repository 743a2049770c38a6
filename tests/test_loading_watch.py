# ruff: noqa: F811  (the stand-in fixtures are imported from test_launcher)
"""While an engine loads, one watch run stays with it (``deployments.runtime.loading_watch``): it
sees ``/health`` answer within a poll, not a monitor interval later; it gives the host's worker
back as soon as another job waits, and after its hold at the latest. Stand-in engine (not vLLM)
on the real Docker engine."""

from __future__ import annotations

import time
from typing import Any

import pytest

from deployments.runtime import launcher
from deployments.runtime.launcher import _docker_time
from deployments.runtime.loading_watch import watch_while_loading
from deployments.states import State
from tests.deployment_builders import on_host
from tests.test_launcher import new_deployment, stand_in  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.docker, pytest.mark.django_db]


def _launched(stand_in: Any, new_deployment: Any, load_s: str) -> Any:
    deployment = new_deployment(stand_in(ENGINE_LOAD_SECONDS=load_s))
    assert on_host(launcher.launch, deployment, 1) == "loading"
    deployment.refresh_from_db()
    return deployment


def _listening_at(docker_client: Any, deployment: Any) -> float:
    """When the engine logged that it listens (Docker's timestamp of the line)."""
    logs = docker_client.containers.get(deployment.container_name).logs(timestamps=True)
    lines = [line for line in logs.decode().splitlines() if "startup complete" in line]
    return _docker_time(lines[-1].split(" ", 1)[0])


def test_one_run_sees_the_engine_ready_within_a_poll_not_an_interval(
    stand_in: Any, new_deployment: Any, docker_client: Any, settings: Any
) -> None:
    settings.BERTH_MONITOR_INTERVAL_S = 20  # only the /health poll can see it in time
    deployment = _launched(stand_in, new_deployment, "3")
    again = on_host(watch_while_loading, deployment, 1, others_waiting=lambda: False, hold_s=60)
    assert again  # a ready engine is still watched, through the scheduler
    assert deployment.state == State.READY
    ready = deployment.events.get(kind="state", state="ready").time.timestamp()
    lag = ready - _listening_at(docker_client, deployment)
    assert lag < 2.0, f"ready {lag:.2f} s after the engine listened"


def test_it_gives_the_worker_back_when_another_job_waits(
    stand_in: Any, new_deployment: Any
) -> None:
    deployment = _launched(stand_in, new_deployment, "60")
    started = time.monotonic()
    again = on_host(watch_while_loading, deployment, 1, others_waiting=lambda: True, hold_s=60)
    assert again
    assert deployment.state == State.LOADING
    assert time.monotonic() - started < 10  # one look, not the hold


def test_it_holds_the_worker_no_longer_than_its_hold(stand_in: Any, new_deployment: Any) -> None:
    deployment = _launched(stand_in, new_deployment, "60")
    started = time.monotonic()
    again = on_host(watch_while_loading, deployment, 1, others_waiting=lambda: False, hold_s=1.5)
    elapsed = time.monotonic() - started
    assert again
    assert deployment.state == State.LOADING
    assert 1.5 <= elapsed < 10


def test_a_stop_requested_meanwhile_ends_the_run(stand_in: Any, new_deployment: Any) -> None:
    """The stop job waits on the queue (``others_waiting``); the state is read again at each
    full look, so even without it the run ends once the deployment is no longer loading."""
    deployment = _launched(stand_in, new_deployment, "60")
    type(deployment).objects.filter(pk=deployment.pk).update(state=State.STOPPING)
    again = on_host(watch_while_loading, deployment, 1, others_waiting=lambda: False, hold_s=60)
    assert not again
    assert deployment.state == State.STOPPING
