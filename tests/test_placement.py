"""Choosing a deployment's GPUs from the host's fresh readings: busy, allocated and stale GPUs
are never chosen, and a refusal says why for each GPU."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from accounts.models import Team
from deployments.models import GpuAllocation
from deployments.runtime.placement import choose_gpus
from gpus.models import HostStatus
from tests.deployment_builders import deployment, host_with_gpus, planned, registered_model

pytestmark = pytest.mark.django_db


@pytest.fixture
def host():
    """Four H100s read a moment ago on an online host: GPU 1 busy with a foreign process."""
    host = host_with_gpus(count=4)
    now = timezone.now()
    type(host).objects.filter(pk=host.pk).update(status=HostStatus.ONLINE, last_heartbeat=now)
    host.refresh_from_db()
    for gpu in host.gpus.all():
        busy = gpu.index == 1
        gpu.seen_at, gpu.memory_used_mib = now, 21_453 if busy else 1
        gpu.memory_free_mib = gpu.memory_total_mib - gpu.memory_used_mib
        gpu.memory_foreign_mib = 21_444 if busy else 0
        gpu.processes = [{"pid": 435, "name": "python3", "used_memory_mib": 21_444}] if busy else []
        gpu.utilization_gpu_pct = 100 if busy else 0
        gpu.save()
    return host


def test_busy_and_allocated_gpus_are_skipped(host, team_a: Team, tmp_path: Path) -> None:
    model = registered_model(team_a, tmp_path)
    holder = deployment(team_a, model, host, "holder")
    GpuAllocation.objects.create(deployment=holder, gpu=host.gpus.get(index=0), generation=1)
    wanted = deployment(team_a, model, host, "wanted", gpu_count=2)
    wanted.plan = planned(gpu_memory_utilization=0.875)  # 70 GiB of an 80 GiB card
    gpus, why_not = choose_gpus(wanted)
    assert (sorted(gpu.index for gpu in gpus), why_not) == ([2, 3], "")


def test_a_refusal_names_each_gpus_reason(host, team_a: Team, tmp_path: Path) -> None:
    model = registered_model(team_a, tmp_path)
    host.gpus.filter(index=3).update(seen_at=timezone.now() - timedelta(hours=1))
    wanted = deployment(team_a, model, host, "wanted", gpu_count=3)
    wanted.plan = planned(gpu_memory_utilization=0.875)  # 70 GiB of an 80 GiB card
    gpus, why_not = choose_gpus(wanted)
    assert gpus == []
    assert "GPU 1: " in why_not
    assert "pid 435 python3" in why_not
    assert "GPU 3: " in why_not
