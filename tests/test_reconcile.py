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
from deployments.models import GpuAllocation
from deployments.reconcile import reconcile_host
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
        too_soon = reconcile_host(host, docker_client)
        assert too_soon.orphans_removed == []  # young containers are left alone...
        assert too_soon.deployments_failed == [vanished.pk]  # ...but a loading one must exist

        result = reconcile_host(host, docker_client, now=timezone.now() + LATER)
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
