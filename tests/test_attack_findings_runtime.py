# ruff: noqa: F811  (the stand-in fixtures are imported from test_launcher)
"""Findings 6, 10, 11 and 12 of the attack on a running console (issue 15), on the real Docker
engine with the stand-in engine (not vLLM): a restart past the allow-list, false
``job_resumed`` events, ``docker kill`` read as host OOM, and ``docker rm -f`` crashing the
watcher."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone
from rq import SimpleWorker

from accounts.models import Team, User
from audit.models import AuditEvent
from core.queues import ContextJob, get_queue, redis_connection
from deployments.models import Deployment
from deployments.runtime import launcher
from deployments.runtime.diagnostics import diagnose
from deployments.runtime.engine_host import EngineHost
from deployments.runtime.jobs import resume, watch_job
from deployments.runtime.reconcile import GRACE, reconcile_host
from deployments.services import request_restart
from deployments.states import State
from tests.deployment_builders import on_host
from tests.test_launcher import new_deployment, stand_in, watch_until  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.docker, pytest.mark.redis]


def _loading(stand_in: Any, new_deployment: Any, **environment: str) -> Deployment:
    deployment = new_deployment(stand_in(ENGINE_LOAD_SECONDS="60", **environment))
    assert on_host(launcher.launch, deployment, 1) == "loading"
    deployment.refresh_from_db()
    return deployment


# --- 11. docker kill is not host OOM ---


@pytest.mark.django_db
def test_finding_11_an_engine_killed_from_outside_is_not_diagnosed_as_host_oom(
    stand_in: Any, new_deployment: Any, docker_client: Any
) -> None:
    deployment = _loading(stand_in, new_deployment)
    container = docker_client.containers.get(deployment.container_name)
    container.kill()
    container.reload()
    assert (container.attrs["State"]["ExitCode"], container.attrs["State"]["OOMKilled"]) == (
        137,
        False,
    )
    watch_until(deployment, {State.FAILED})
    codes = [finding["code"] for finding in deployment.diagnosis]
    assert codes[0] == "killed-from-outside", codes
    assert "host-oom-killed" not in codes
    # The flag, not the exit code, says the kernel ended it for memory.
    assert diagnose("", exit_code=137, oom_killed=True)[0].code == "host-oom-killed"
    assert diagnose("Killed\n", exit_code=137, oom_killed=False)[0].code == "host-oom-killed"


# --- 12. docker rm -f while the watcher looks ---


@pytest.mark.django_db
def test_finding_12_removal_in_progress_reads_as_gone_not_a_crash(
    stand_in: Any, new_deployment: Any, docker_client: Any
) -> None:
    """``docker rm -f`` races the watcher: while the removal runs Docker answers 409 "dead or
    marked for removal" (not 404). Watched in a tight loop, as the job would, three times."""
    image = stand_in(ENGINE_LOAD_SECONDS="60")
    for attempt in range(3):
        deployment = new_deployment(image, name=f"tiny-{attempt}")
        assert on_host(launcher.launch, deployment, 1) == "loading"
        deployment.refresh_from_db()
        container_id = deployment.container_id
        remover = threading.Thread(
            target=lambda cid=container_id: docker_client.api.remove_container(cid, force=True)
        )
        deadline = time.monotonic() + 30
        with EngineHost.of(deployment.host) as engine:  # one client: a tight loop, as a job's
            remover.start()
            while launcher.watch(engine, deployment, 1):
                assert time.monotonic() < deadline
                deployment.refresh_from_db()
        remover.join()
        deployment.refresh_from_db()
        assert deployment.state == State.FAILED
        assert "disappeared" in deployment.last_error or "removed" in deployment.last_error
        assert not deployment.allocations.filter(active=True).exists()


# --- 10. no false job_resumed ---


@pytest.mark.django_db(transaction=True)
def test_finding_10_a_watcher_that_rebooked_itself_is_not_resumed(
    stand_in: Any, new_deployment: Any, docker_client: Any
) -> None:
    """The watcher books its next run under its own id and then finishes: the id's status reads
    "finished" while the next run waits in the scheduled registry. Reconcile must see it."""
    deployment = _loading(stand_in, new_deployment)
    queue = get_queue(deployment.host.queue_name)
    resume("watch", deployment)  # as the launch job does: the first look, due now
    worker = SimpleWorker([queue], connection=redis_connection(), job_class=ContextJob)
    try:
        worker.work(burst=True, with_scheduler=True)
        job_id = f"watch-{deployment.pk}-1"
        assert job_id in queue.scheduled_job_registry.get_job_ids()  # it booked its next look
        Deployment.objects.filter(pk=deployment.pk).update(updated=timezone.now() - 2 * GRACE)
        result = reconcile_host(deployment.host, EngineHost(docker_client), resume=resume)
        assert result.jobs_resumed == []
        assert not AuditEvent.objects.filter(action="reconcile.job_resumed").exists()
    finally:
        queue.scheduled_job_registry.remove(f"watch-{deployment.pk}-1", delete_job=True)
        queue.empty()


# --- 6. restart re-validates ---


def _stopped(stand_in: Any, new_deployment: Any) -> Deployment:
    deployment = new_deployment(stand_in())
    Deployment.objects.filter(pk=deployment.pk).update(state=State.STOPPED)
    deployment.refresh_from_db()
    return deployment


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("image-disabled", "image"),
        ("model-errors", "model"),
        ("remote-code-revoked", "trust_remote_code"),
        ("quota-zero", "gpu_count"),
    ],
)
def test_finding_06_restart_revalidates_like_a_new_request(
    stand_in: Any,
    new_deployment: Any,
    alice: User,
    team_a: Team,
    change: str,
    field: str,
) -> None:
    deployment = _stopped(stand_in, new_deployment)
    queue = get_queue(deployment.host.queue_name)
    queue.empty()
    if change == "image-disabled":
        deployment.image.enabled = False
        deployment.image.save()
    elif change == "model-errors":
        type(deployment.model).objects.filter(pk=deployment.model.pk).update(status="errors")
    elif change == "remote-code-revoked":
        Deployment.objects.filter(pk=deployment.pk).update(engine_args={"trust_remote_code": True})
    else:
        Team.objects.filter(pk=team_a.pk).update(gpu_quota=0)
        Deployment.objects.filter(pk=deployment.pk).update(gpu_count=1)
    deployment = Deployment.objects.get(pk=deployment.pk)
    with pytest.raises(ValidationError) as refused:
        request_restart(alice, deployment)
    assert field in refused.value.message_dict, refused.value.message_dict
    deployment.refresh_from_db()
    assert (deployment.state, deployment.generation) == (State.STOPPED, 1)
    assert queue.count == 0
    event = AuditEvent.objects.get(action="deployment.restart_requested")
    assert event.outcome == "denied"


@pytest.mark.django_db
def test_finding_06_the_launcher_revalidates_too(
    stand_in: Any, new_deployment: Any, alice: User, docker_client: Any
) -> None:
    """Queued before the admin disabled the image: the launch job refuses it, creates nothing."""
    deployment = new_deployment(stand_in())
    deployment.image.enabled = False
    deployment.image.save()
    deployment.refresh_from_db()
    result = on_host(launcher.launch, deployment, 1)
    deployment.refresh_from_db()
    assert deployment.state == State.FAILED, result
    assert "allow-list" in deployment.last_error
    assert (
        docker_client.containers.list(all=True, filters={"name": deployment.container_name}) == []
    )
    assert AuditEvent.objects.filter(
        action="deployment.launch_refused", outcome="denied", target_id=str(deployment.pk)
    ).exists()


@pytest.mark.django_db
def test_finding_06_restart_from_the_page_is_refused_with_the_reason(
    stand_in: Any, new_deployment: Any, alice: User
) -> None:
    deployment = _stopped(stand_in, new_deployment)
    deployment.image.enabled = False
    deployment.image.save()
    client = Client()
    client.force_login(alice)
    response = client.post(f"/deployments/{deployment.public_id}/restart/", follow=True)
    assert "not on the allow-list" in response.content.decode()
    deployment.refresh_from_db()
    assert deployment.state == State.STOPPED


# --- 5. a scheduled watcher that did not run ---


@pytest.mark.django_db(transaction=True)
def test_finding_05_reconcile_rebooks_a_watcher_whose_schedule_nobody_ran(
    stand_in: Any, new_deployment: Any, docker_client: Any
) -> None:
    """The watcher's next look sits in the scheduled registry, due two minutes ago: no
    scheduler moved it (RQ's died with a Redis restart). It reads "scheduled", but it is lost."""
    deployment = _loading(stand_in, new_deployment)
    queue = get_queue(deployment.host.queue_name)
    job_id = f"watch-{deployment.pk}-1"
    queue.enqueue_at(
        timezone.now() - timedelta(minutes=2),
        watch_job,
        deployment.pk,
        1,
        job_id=job_id,
    )
    try:
        result = reconcile_host(deployment.host, EngineHost(docker_client), resume=resume)
        assert result.jobs_resumed == [job_id]
        assert job_id in queue.job_ids  # on the queue itself: no scheduler needed
        assert job_id not in queue.scheduled_job_registry.get_job_ids()
        event = AuditEvent.objects.get(action="reconcile.job_resumed")
        assert "overdue" in event.payload["why"]
    finally:
        queue.empty()
