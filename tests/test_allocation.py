"""GPU allocation: never the same GPU twice, even when launches race (on SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from django.db import IntegrityError, connections, transaction

from accounts.models import Team
from audit.models import AuditEvent
from deployments.models import GpuAllocation
from deployments.runtime.allocation import AllocationConflict, release, reserve
from tests.deployment_builders import deployment, host_with_gpus, registered_model

RACERS = 8


@pytest.mark.django_db
def test_reserve_then_conflict_then_release(team_a: Team, tmp_path: Path) -> None:
    host = host_with_gpus()
    model = registered_model(team_a, tmp_path)
    first, second = (
        deployment(team_a, model, host, "one", 2),
        deployment(team_a, model, host, "two", 2),
    )
    gpus = list(host.gpus.order_by("index"))
    reserve(first, gpus[:2])
    with pytest.raises(
        AllocationConflict, match="GPU 1 on this host is held by deployment team-a/one"
    ):
        reserve(second, gpus[1:3])
    assert GpuAllocation.objects.filter(deployment=second).count() == 0  # all or none
    assert release(first, reason="stopped") == 2
    reserve(second, gpus[1:3])
    actions = list(AuditEvent.objects.order_by("seq").values_list("action", flat=True))
    assert actions[-3:] == ["gpu.reserved", "gpu.released", "gpu.reserved"]


@pytest.mark.django_db
def test_the_database_refuses_a_second_active_allocation(team_a: Team, tmp_path: Path) -> None:
    host = host_with_gpus(count=1)
    model = registered_model(team_a, tmp_path)
    gpu = host.gpus.get()
    GpuAllocation.objects.create(
        deployment=deployment(team_a, model, host, "one"), gpu=gpu, generation=1
    )
    with pytest.raises(IntegrityError), transaction.atomic():
        GpuAllocation.objects.create(
            deployment=deployment(team_a, model, host, "two"), gpu=gpu, generation=1
        )
    GpuAllocation.objects.update(active=False)
    GpuAllocation.objects.create(
        deployment=deployment(team_a, model, host, "three"), gpu=gpu, generation=1
    )


@pytest.mark.django_db(transaction=True)
def test_racing_launches_never_double_book_a_gpu(tmp_path: Path) -> None:
    team = Team.objects.create(slug="team-a", name="Team A")
    host = host_with_gpus(count=1)
    model = registered_model(team, tmp_path)
    contenders = [deployment(team, model, host, f"d{index}") for index in range(RACERS)]
    gpu = host.gpus.get()
    start = threading.Barrier(RACERS)
    outcomes: list[str] = []

    def launch(candidate) -> None:
        try:
            start.wait()
            reserve(candidate, [gpu])
            outcomes.append("won")
        except AllocationConflict:
            outcomes.append("conflict")
        finally:
            connections.close_all()

    threads = [threading.Thread(target=launch, args=(candidate,)) for candidate in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["conflict"] * (RACERS - 1) + ["won"]
    assert GpuAllocation.objects.filter(gpu=gpu, active=True).count() == 1


CONTENDERS = 50
FREE_GPUS = 8


@pytest.mark.django_db(transaction=True)
def test_fifty_launches_for_eight_free_gpus(tmp_path: Path) -> None:
    """Each contender takes the lowest GPU it believes free and retries on conflict: exactly
    eight win, no GPU is held twice, and every loser is told why."""
    team = Team.objects.create(slug="team-a", name="Team A")
    host = host_with_gpus(count=FREE_GPUS)
    model = registered_model(team, tmp_path)
    contenders = [deployment(team, model, host, f"d{index}") for index in range(CONTENDERS)]
    gpus = list(host.gpus.order_by("index"))
    start = threading.Barrier(CONTENDERS)
    outcomes: dict[str, str] = {}

    def claim(candidate) -> None:
        try:
            start.wait()
            for _attempt in range(FREE_GPUS + 2):
                held = set(
                    GpuAllocation.objects.filter(active=True).values_list("gpu_id", flat=True)
                )
                free = [gpu for gpu in gpus if gpu.pk not in held]
                if not free:
                    outcomes[candidate.name] = "no free GPU left on gpu-01"
                    return
                try:
                    reserve(candidate, free[:1])
                except AllocationConflict as exc:
                    outcomes[candidate.name] = str(exc)
                    continue
                outcomes[candidate.name] = "won"
                return
        finally:
            connections.close_all()

    threads = [threading.Thread(target=claim, args=(candidate,)) for candidate in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    winners = [name for name, outcome in outcomes.items() if outcome == "won"]
    assert len(winners) == FREE_GPUS
    assert len(outcomes) == CONTENDERS
    assert all(outcome for outcome in outcomes.values())  # every loser has a reason
    active = list(GpuAllocation.objects.filter(active=True).values_list("gpu_id", flat=True))
    assert sorted(active) == sorted(gpu.pk for gpu in gpus)  # each GPU exactly once
