"""Launching on the real Docker engine with the stand-in engine (not vLLM): loading → ready with
milestones, stop, a failing engine diagnosed, the GPU request refused with the runtime message,
and a retried launch adopting its container. Nothing is left running."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client

from accounts.models import Team, User
from audit.models import AuditEvent
from deployments.models import Deployment, EngineImage, GpuAllocation
from deployments.runtime import launcher
from deployments.states import State
from tests.deployment_builders import (
    host_with_gpus,
    on_host,
    planned,
    registered_model,
    remove_engines,
)
from tests.model_dirs import write_model

pytestmark = [pytest.mark.docker, pytest.mark.django_db]
DEADLINE_S = 60


@pytest.fixture
def stand_in(engine_image: str) -> Callable[..., EngineImage]:
    """The stand-in engine on the allow-list, CPU-capable, with admin-set behaviour."""

    def make(**environment: str) -> EngineImage:
        image = EngineImage(
            name=f"stand-in-{len(environment)}-{abs(hash(tuple(environment.items()))) % 10**6}",
            reference=engine_image,
            gpu_capable=False,
            cpu_capable=True,
            is_stand_in=True,
            health_command=[
                "curl",
                "-fsS",
                "-o",
                "/dev/null",
                "--max-time",
                "5",
                "http://127.0.0.1:8000/health",
            ],
            environment={"ENGINE_LOAD_SECONDS": "1", **environment},
        )
        image.full_clean()
        image.save()
        return image

    return make


@pytest.fixture
def new_deployment(
    team_a: Team, tmp_path: Path, docker_client: Any
) -> Iterator[Callable[..., Deployment]]:
    """A queued deployment of a real tiny model directory; its containers are removed after."""
    write_model(tmp_path / "team-a" / "tiny")
    model = registered_model(team_a, tmp_path, "tiny")
    host = host_with_gpus(count=1)
    made: list[Deployment] = []

    def make(image: EngineImage, gpu_count: int = 0, name: str = "tiny") -> Deployment:
        deployment = Deployment.objects.create(
            name=name,
            team=team_a,
            model=model,
            host=host,
            image=image,
            gpu_count=gpu_count,
            state=State.QUEUED,
            stall_timeout_s=30,
            plan=planned(max_model_len=2048, gpu_memory_utilization=0.9),
        )
        made.append(deployment)
        return deployment

    yield make
    remove_engines(docker_client, made)


def watch_until(deployment: Deployment, states: set[State]) -> None:
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        deployment.refresh_from_db()
        if deployment.state in states:
            return
        if not on_host(launcher.watch, deployment, deployment.generation):
            deployment.refresh_from_db()
            break
        time.sleep(0.2)
    assert deployment.state in states, (
        deployment.state,
        deployment.last_error,
        deployment.log_tail[-10:],
    )


def test_launch_loads_becomes_ready_and_stops_cleanly(
    stand_in, new_deployment, docker_client: Any
) -> None:
    deployment = new_deployment(stand_in())
    assert on_host(launcher.launch, deployment, 1) == "loading"
    watch_until(deployment, {State.READY})
    states = list(deployment.events.filter(kind="state").values_list("state", flat=True))
    assert states == ["launching", "loading", "ready"]
    # The engine may answer /health a moment before it prints its last line: keep watching.
    end = time.monotonic() + DEADLINE_S
    while not deployment.events.filter(kind="progress", message="server started").exists():
        assert time.monotonic() < end, deployment.log_tail[-5:]
        on_host(launcher.watch, deployment, 1)
        deployment.refresh_from_db()
        time.sleep(0.1)
    assert any(line.endswith("Application startup complete.") for line in deployment.log_tail)
    container = docker_client.containers.get(deployment.container_name)
    assert container.labels["berth.deployment"] == str(deployment.pk)

    Deployment.objects.filter(pk=deployment.pk).update(state=State.STOPPING)
    deployment.refresh_from_db()
    assert on_host(launcher.stop, deployment, 1) == "stopped"
    assert (
        docker_client.containers.list(all=True, filters={"name": deployment.container_name}) == []
    )


def test_failing_engine_ends_failed_with_its_diagnosis_and_nothing_left(
    stand_in, new_deployment, docker_client: Any
) -> None:
    deployment = new_deployment(stand_in(ENGINE_FAIL="cuda-oom"))
    on_host(launcher.launch, deployment, 1)
    watch_until(deployment, {State.FAILED})
    assert deployment.diagnosis[0]["code"] == "cuda-oom"
    # Docker's restart policy may have restarted it before the watcher looked: either way the
    # cause is named.
    assert "The GPU ran out of memory" in deployment.last_error
    assert (
        docker_client.containers.list(all=True, filters={"name": deployment.container_name}) == []
    )


def test_gpu_request_fails_cleanly_with_the_runtime_message(
    stand_in, new_deployment, docker_client: Any
) -> None:
    image = stand_in()
    EngineImage.objects.filter(pk=image.pk).update(gpu_capable=True)
    image.refresh_from_db()
    deployment = new_deployment(image, gpu_count=1)
    result = on_host(launcher.launch, deployment, 1, gpus=list(deployment.host.gpus.all()))
    deployment.refresh_from_db()
    assert result.startswith("failed")
    assert deployment.state == State.FAILED
    assert "this host has no NVIDIA container runtime" in deployment.last_error
    assert deployment.diagnosis[0]["code"] == "no-nvidia-runtime"
    assert "nvidia-container-toolkit" in deployment.diagnosis[0]["remedy"]
    assert (
        docker_client.containers.list(all=True, filters={"name": deployment.container_name}) == []
    )
    assert not GpuAllocation.objects.filter(active=True).exists()  # released


def test_a_retried_launch_adopts_the_container_instead_of_creating_another(
    stand_in, new_deployment, docker_client: Any
) -> None:
    deployment = new_deployment(stand_in())
    spec = launcher.build_spec(deployment, [], launcher._port(deployment))
    first = launcher._create_or_adopt(docker_client, spec)  # a worker died right after this
    Deployment.objects.filter(pk=deployment.pk).update(state=State.LAUNCHING)
    deployment.refresh_from_db()
    assert on_host(launcher.launch, deployment, 1) == "loading"
    assert deployment.container_id == first.id
    assert (
        len(
            docker_client.containers.list(
                all=True, filters={"name": f"{settings.BERTH_INSTANCE}-{deployment.pk}-g"}
            )
        )
        == 1
    )


def test_a_stale_generation_does_nothing(stand_in, new_deployment, docker_client: Any) -> None:
    deployment = new_deployment(stand_in())
    assert on_host(launcher.launch, deployment, 0) == "stale generation: nothing to do"
    assert (
        docker_client.containers.list(
            all=True, filters={"name": f"{settings.BERTH_INSTANCE}-{deployment.pk}-g"}
        )
        == []
    )


def test_a_host_port_held_by_another_program_is_skipped(stand_in, new_deployment, settings) -> None:
    import socket

    settings.BERTH_ENGINE_PORT_MIN += 50  # a part of this process's range no other test used
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", settings.BERTH_ENGINE_PORT_MIN))
        squatter.listen()
        deployment = new_deployment(stand_in())
        assert on_host(launcher.launch, deployment, 1) == "loading"
    deployment.refresh_from_db()
    assert deployment.host_port == settings.BERTH_ENGINE_PORT_MIN + 1


def test_container_killed_while_loading_ends_failed(
    stand_in, new_deployment, docker_client: Any
) -> None:
    deployment = new_deployment(stand_in(ENGINE_LOAD_SECONDS="30"))
    assert on_host(launcher.launch, deployment, 1) == "loading"
    docker_client.containers.get(deployment.container_name).kill()
    watch_until(deployment, {State.FAILED})
    assert "exited with code 137" in deployment.last_error or "restarted" in deployment.last_error
    assert (
        docker_client.containers.list(all=True, filters={"name": deployment.container_name}) == []
    )


def test_container_removed_behind_berths_back_ends_failed(
    stand_in, new_deployment, docker_client: Any
) -> None:
    deployment = new_deployment(stand_in(ENGINE_LOAD_SECONDS="30"))
    on_host(launcher.launch, deployment, 1)
    docker_client.containers.get(deployment.container_name).remove(force=True)
    deployment.refresh_from_db()
    assert on_host(launcher.watch, deployment, 1) is False
    deployment.refresh_from_db()
    assert deployment.state == State.FAILED
    assert "disappeared" in deployment.last_error


def test_delete_removes_the_cache_volume_then_the_record(
    stand_in, new_deployment, docker_client: Any
) -> None:
    from audit.models import AuditEvent

    deployment = new_deployment(stand_in())
    on_host(launcher.launch, deployment, 1)
    volume = f"{settings.BERTH_INSTANCE}-cache-{deployment.pk}"
    assert docker_client.volumes.list(filters={"name": volume})
    assert on_host(launcher.delete, deployment, 1).startswith("nothing to do")  # still running
    Deployment.objects.filter(pk=deployment.pk).update(state=State.STOPPING)
    deployment.refresh_from_db()
    on_host(launcher.stop, deployment, 1)
    assert on_host(launcher.delete, deployment, 1) == "deleted"
    assert not Deployment.objects.filter(pk=deployment.pk).exists()
    assert not [v for v in docker_client.volumes.list(filters={"name": volume}) if v.name == volume]
    assert AuditEvent.objects.get(action="deployment.deleted").payload["volume"] == volume


def test_a_revoked_remote_code_approval_stops_the_launch_cleanly(
    stand_in, new_deployment, docker_client: Any
) -> None:
    deployment = new_deployment(stand_in())
    Deployment.objects.filter(pk=deployment.pk).update(engine_args={"trust_remote_code": True})
    deployment.refresh_from_db()
    assert on_host(launcher.launch, deployment, 1).startswith("failed")
    deployment.refresh_from_db()
    assert deployment.state == State.FAILED
    assert "not approved for remote code" in deployment.last_error
    assert (
        docker_client.containers.list(all=True, filters={"name": deployment.container_name}) == []
    )


def test_an_auditor_filtering_on_failed_finds_the_failed_launch(
    stand_in, new_deployment, carol: User
) -> None:
    deployment = new_deployment(stand_in(ENGINE_FAIL="cuda-oom"))
    on_host(launcher.launch, deployment, 1)
    watch_until(deployment, {State.FAILED})
    failed = AuditEvent.objects.get(action="deployment.state_changed", outcome="failed")
    assert failed.target_id == str(deployment.pk)
    assert failed.change[1] == "failed"
    assert not AuditEvent.objects.filter(
        action="deployment.state_changed", outcome="ok", payload_json__contains='"new":"failed"'
    ).exists()
    client = Client()
    client.force_login(carol)
    html = client.get("/audit/?outcome=failed").content.decode()
    assert f'<a href="/audit/events/{failed.seq}/">' in html
    assert f"{failed.change[0]} → failed" in html  # the review shows old → new
