"""Garbage collection on the real Docker engine: stopped Berth containers go, live ones stay,
the builder cache is pruned exec-style and its output parsed, the run is audited."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import pytest
from django.conf import settings

import docker
from audit.models import AuditEvent
from deployments.runtime.engine_host import EngineHost
from deployments.runtime.gc import collect, parse_reclaimed, prune_builder_cache


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("Total reclaimed space: 0B\n", 0),
        ("ID\nabc\nTotal reclaimed space: 1.5GB\n", 1_500_000_000),
        ("Total:\t312.4MB\n", 312_400_000),
        ("Total reclaimed space: 2GiB", 2 * 1024**3),
        ("nothing useful", 0),
    ],
)
def test_builder_prune_output_is_parsed(output: str, expected: int) -> None:
    assert parse_reclaimed(output) == expected


@pytest.mark.docker
def test_builder_prune_runs_exec_style_against_the_engine(docker_client: Any) -> None:
    assert prune_builder_cache(24 * 365) >= 0


def test_age_must_be_a_whole_number() -> None:
    from deployments.runtime.gc import GcError

    with pytest.raises(GcError, match="non-negative whole number"):
        prune_builder_cache("24h; rm -rf /")  # type: ignore[arg-type]


@pytest.mark.docker
@pytest.mark.django_db
def test_collect_removes_stopped_berth_containers_but_not_live_ones(
    docker_client: Any, busybox_image: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    labels = {"berth.managed": "true", "berth.instance": settings.BERTH_INSTANCE}
    dead = docker_client.containers.create(
        busybox_image,
        ["true"],
        name=f"berth-test-gc-dead-{tag}",
        labels={**labels, "berth.deployment": f"dead-{tag}"},
    )
    live = docker_client.containers.create(
        busybox_image,
        ["true"],
        name=f"berth-test-gc-live-{tag}",
        labels={**labels, "berth.deployment": f"live-{tag}"},
    )
    other_console = docker_client.containers.create(
        busybox_image,
        ["true"],
        name=f"berth-test-gc-other-{tag}",
        labels={"berth.managed": "true", "berth.instance": "someone-else", "berth.deployment": "1"},
    )
    foreign = docker_client.containers.create(
        busybox_image, ["true"], name=f"berth-test-gc-foreign-{tag}"
    )
    try:
        result = collect(EngineHost(docker_client), live_deployments={f"live-{tag}"}, host="local")
        remaining = {container.name for container in docker_client.containers.list(all=True)}
        assert dead.name in result.containers_removed
        assert dead.name not in remaining
        assert {
            live.name,
            foreign.name,
        } <= remaining  # live deployment and non-Berth container kept
        assert result.errors == []
        event = AuditEvent.objects.get(action="gc.ran")
        assert (event.outcome, event.payload["host"]) == ("ok", "local")
        assert dead.name in event.payload["containers_removed"]
        assert event.payload["bytes_reclaimed"] == result.bytes_reclaimed
    finally:
        for container in (dead, live, foreign, other_console):
            with contextlib.suppress(docker.errors.NotFound):  # the collector removed it
                container.remove(force=True)


@pytest.mark.docker
@pytest.mark.redis
@pytest.mark.django_db
def test_admins_queue_gc_per_host_and_the_job_keeps_live_engines(
    admin: Any, docker_client: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from django.test import Client

    from core.queues import get_queue
    from deployments.runtime.jobs import gc_job
    from gpus.models import Host

    host = Host.objects.create(name="gc-host")
    queue = get_queue(host.queue_name)
    queue.empty()
    client = Client()
    client.force_login(admin)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/admin/gpus/host/", {"action": "collect_garbage", "_selected_action": [host.pk]}
        )
    assert response.status_code == 302
    requested = AuditEvent.objects.get(action="gc.requested")
    assert queue.job_ids == [requested.payload["job_id_queued"]]
    queue.empty()
    result = gc_job(host.pk)
    assert result["errors"] == []
    assert AuditEvent.objects.get(action="gc.ran").payload["host"] == "gc-host"
