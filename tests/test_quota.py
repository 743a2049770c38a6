"""Team GPU quotas: refused when planning, and again — race-free — when reserving."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from django.db import connections

from accounts.models import Team
from deployments.models import GpuAllocation
from deployments.runtime.allocation import QuotaExceeded, reserve
from tests.deployment_builders import deployment, host_with_gpus, registered_model

RACERS = 10


@pytest.mark.django_db
def test_reserving_past_the_quota_is_refused_with_the_numbers(team_a: Team, tmp_path: Path) -> None:
    team_a.gpu_quota = 3
    team_a.save()
    host = host_with_gpus(count=4)
    model = registered_model(team_a, tmp_path)
    gpus = list(host.gpus.order_by("index"))
    reserve(deployment(team_a, model, host, "one", 2), gpus[:2])
    with pytest.raises(
        QuotaExceeded,
        match="quota exceeded: team team-a uses 2 of 3 GPUs and this deployment needs 2",
    ):
        reserve(deployment(team_a, model, host, "two", 2), gpus[2:4])
    assert GpuAllocation.objects.filter(active=True).count() == 2


@pytest.mark.django_db(transaction=True)
def test_racing_launches_of_one_team_cannot_pass_the_quota_together(tmp_path: Path) -> None:
    team = Team.objects.create(slug="team-a", name="Team A", gpu_quota=2)
    host = host_with_gpus(count=RACERS)
    model = registered_model(team, tmp_path)
    gpus = list(host.gpus.order_by("index"))
    contenders = [deployment(team, model, host, f"d{index}") for index in range(RACERS)]
    start = threading.Barrier(RACERS)
    outcomes: list[str] = []

    def launch(index: int) -> None:
        try:
            start.wait()
            reserve(contenders[index], [gpus[index]])
            outcomes.append("won")
        except QuotaExceeded:
            outcomes.append("quota")
        finally:
            connections.close_all()

    threads = [threading.Thread(target=launch, args=(index,)) for index in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(outcomes) == ["quota"] * (RACERS - 2) + ["won", "won"]
    assert GpuAllocation.objects.filter(active=True).count() == 2
