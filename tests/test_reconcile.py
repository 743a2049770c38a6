"""Reconcile on the real Docker engine: orphans removed after the grace period, vanished
containers fail their deployment and free its GPUs, live engines untouched, stray allocations
released — each audited."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

from accounts.models import Team
from audit.models import AuditEvent
from deployments.models import Deployment, GpuAllocation
from deployments.runtime.engine_host import EngineHost
from deployments.runtime.jobs import resume
from deployments.runtime.reconcile import reconcile_host
from deployments.states import State
from tests.deployment_builders import deployment, host_with_gpus, registered_model

pytestmark = [pytest.mark.docker, pytest.mark.django_db]
LATER = timedelta(minutes=5)


def labelled(
    docker_client: Any, image: str, name: str, deployment_id: str, generation: int = 1
) -> Any:
    return docker_client.containers.create(image, ["sleep", "60"], name=name, labels={
        "berth.managed": "true", "berth.instance": settings.BERTH_INSTANCE,
        "berth.deployment": deployment_id, "berth.generation": str(generation),
    })  # fmt: skip


def test_reconcile(docker_client: Any, busybox_image: str, team_a: Team, tmp_path: Path) -> None:
    host = host_with_gpus(count=2)
    model = registered_model(team_a, tmp_path)
    serving = deployment(team_a, model, host, "serving")
    vanished = deployment(team_a, model, host, "vanished")
    stopped = deployment(team_a, model, host, "stopped")
    for record, state in (
        (serving, State.READY),
        (vanished, State.LOADING),
        (stopped, State.STOPPED),
    ):
        type(record).objects.filter(pk=record.pk).update(state=state)
        record.refresh_from_db()
    gpus = list(host.gpus.order_by("index"))
    GpuAllocation.objects.create(deployment=vanished, gpu=gpus[0], generation=1)
    GpuAllocation.objects.create(deployment=stopped, gpu=gpus[1], generation=1)
    live = labelled(docker_client, busybox_image, serving.container_name, str(serving.pk))
    orphan = labelled(
        docker_client, busybox_image, f"{settings.BERTH_INSTANCE}-999999-g1", "999999"
    )
    stale = labelled(
        docker_client,
        busybox_image,
        f"{settings.BERTH_INSTANCE}-{serving.pk}-g0",
        str(serving.pk),
        0,
    )
    try:
        too_soon = reconcile_host(host, EngineHost(docker_client), resume=resume)
        assert too_soon.orphans_removed == []  # young containers are left alone...
        assert too_soon.deployments_failed == [vanished.pk]  # ...but a loading one must exist

        later = timezone.now() + LATER
        result = reconcile_host(host, EngineHost(docker_client), resume=resume, now=later)
        names = {c.name for c in docker_client.containers.list(all=True)}
        assert sorted(result.orphans_removed) == sorted([orphan.name, stale.name])
        assert live.name in names
        assert orphan.name not in names
        assert result.deployments_failed == []
        vanished.refresh_from_db()
        assert vanished.state == State.FAILED
        assert "is gone from" in vanished.last_error
        assert not GpuAllocation.objects.filter(active=True).exists()
        assert too_soon.allocations_released == 1  # the stopped deployment's stray allocation
        serving.refresh_from_db()
        assert serving.state == State.READY
        assert AuditEvent.objects.filter(action="reconcile.orphan_removed").count() == 2
    finally:
        for container in (live, orphan, stale):
            try:
                container.remove(force=True)
            except Exception:  # noqa: S112 - removed by reconcile
                continue


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_a_launch_whose_worker_died_runs_again_and_adopts_its_container(
    docker_client: Any, engine_image: str, tmp_path: Path
) -> None:
    """The worker died after creating the container: reconcile finds the launch job gone,
    enqueues it again, and the rerun adopts the container (still one)."""
    from deployments.models import Deployment, EngineImage
    from deployments.runtime import launcher
    from tests.conftest import run_manage, subprocess_env
    from tests.model_dirs import write_model

    team = Team.objects.create(slug="team-a", name="Team A")
    write_model(tmp_path / "team-a" / "llama")
    model = registered_model(team, tmp_path)
    host = host_with_gpus(count=1)
    image = EngineImage.objects.create(
        name="stand-in",
        reference=engine_image,
        gpu_capable=False,
        cpu_capable=True,
        is_stand_in=True,  # the launch re-plans like a new request: the stand-in needs no memory
        health_command=["curl", "-fsS", "http://127.0.0.1:8000/health"],
        environment={"ENGINE_LOAD_SECONDS": "1"},
    )
    record = Deployment.objects.create(
        name="llama",
        team=team,
        model=model,
        host=host,
        image=image,
        gpu_count=0,
        state=State.LAUNCHING,
    )
    spec = launcher.build_spec(record, [], launcher._port(record))
    created = launcher._create_or_adopt(docker_client, spec)  # ...and then the worker was killed
    Deployment.objects.filter(pk=record.pk).update(updated=timezone.now() - LATER)
    try:
        result = reconcile_host(host, EngineHost(docker_client), resume=resume)
        assert result.jobs_resumed == [f"launch-{record.pk}-1"]
        again = reconcile_host(host, EngineHost(docker_client), resume=resume)
        assert again.jobs_resumed == []  # queued once, not twice
        worker = run_manage("berth_worker", host.queue_name, "--burst", env=subprocess_env())
        assert worker.returncode == 0, worker.stderr
        record.refresh_from_db()
        # The launch's first look at the engine goes straight onto the queue: the burst worker
        # may run it too.
        assert record.state in (State.LOADING, State.READY), record.last_error
        assert record.container_id == created.id
        mine = docker_client.containers.list(
            all=True, filters={"label": f"berth.instance={settings.BERTH_INSTANCE}"}
        )
        assert [c.name for c in mine if c.labels.get("berth.deployment") == str(record.pk)] == [
            spec.container_name
        ]
        assert AuditEvent.objects.filter(action="reconcile.job_resumed").count() == 1
    finally:
        created.remove(force=True)


@pytest.mark.redis
def test_a_launch_requested_while_redis_was_down_is_enqueued_by_reconcile(
    docker_client: Any,
    team_a: Team,
    tmp_path: Path,
    settings: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    from core import queues
    from core.queues import get_queue
    from deployments.models import Deployment
    from deployments.services import DeployRequest, request_deployment
    from tests.deployment_builders import engine_image as vllm_image
    from tests.model_dirs import write_model

    write_model(tmp_path / "team-a" / "llama")
    model = registered_model(team_a, tmp_path)
    host = host_with_gpus(count=1)
    image = vllm_image()
    image.cpu_capable = True
    image.is_stand_in = True  # a real CPU engine would be planned from the model's config first
    image.save()
    working_url = settings.REDIS_URL
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # Redis is down
    queues.redis_connection.cache_clear()
    try:
        with django_capture_on_commit_callbacks(execute=True):
            record = request_deployment(
                _admin(),
                DeployRequest(
                    team=team_a, model=model, host=host, image=image, name="llama", gpu_count=0
                ),
            )
    finally:
        settings.REDIS_URL = working_url
        queues.redis_connection.cache_clear()
    assert Deployment.objects.get(pk=record.pk).state == State.QUEUED  # committed, job not sent
    queue = get_queue(host.queue_name)
    queue.empty()
    Deployment.objects.filter(pk=record.pk).update(updated=timezone.now() - LATER)
    with django_capture_on_commit_callbacks(execute=True):
        outcome = reconcile_host(host, EngineHost(docker_client), resume=resume)
    assert outcome.jobs_resumed == [f"launch-{record.pk}-1"]
    assert queue.job_ids == [f"launch-{record.pk}-1"]
    queue.empty()


def _admin() -> Any:
    from accounts.models import Role, User

    return User.objects.create_user("ops", password="x" * 16, role=Role.ADMIN)


@pytest.mark.redis
def test_a_delete_whose_job_was_lost_is_enqueued_again(
    docker_client: Any, team_a: Team, tmp_path: Path, django_capture_on_commit_callbacks: Any
) -> None:
    from core.queues import get_queue
    from tests.model_dirs import write_model

    write_model(tmp_path / "team-a" / "llama")
    host = host_with_gpus(count=1)
    record = deployment(team_a, registered_model(team_a, tmp_path), host)
    queue = get_queue(host.queue_name)
    queue.empty()
    asked = timezone.now() - LATER
    Deployment.objects.filter(pk=record.pk).update(
        state=State.STOPPED, delete_requested_at=asked, updated=asked
    )  # ...and Redis lost the delete job
    with django_capture_on_commit_callbacks(execute=True):
        outcome = reconcile_host(host, EngineHost(docker_client), resume=resume)
    assert outcome.jobs_resumed == [f"delete-{record.pk}-1"]
    assert queue.job_ids == [f"delete-{record.pk}-1"]
    queue.empty()
