"""Finding 3 of the attack on a running console (issue 15): deadlocks on PostgreSQL between the
audit chain's lock and row locks answered 500, left requests unaudited and killed launch jobs.

Now one lock order holds everywhere (``audit/trail.py``: the chain lock before any row lock),
a deadlock is retried, and contention that outlasts the retries answers 503 with
``Retry-After`` — audited, never a 500."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from django.db import connections, transaction
from django.http import HttpResponse
from django.test import Client

import audit
from accounts.models import Team, User
from audit import trail
from audit.actions import Action
from audit.contention import ContentionMiddleware
from audit.models import AuditEvent
from core.contention import Contended, is_contention, retrying
from deployments.models import Deployment, EngineImage
from deployments.runtime.allocation import release, reserve
from tests.deployment_builders import host_with_gpus, registered_model

THREADS = 30
RACE_SECONDS = 4.0


def _client(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
def test_finding_03_thirty_same_name_deploys_for_two_teams_never_answer_500(
    alice: User, bob: User, tmp_path: Path
) -> None:
    team_a, team_b = alice.teams.get(), bob.teams.get()
    host = host_with_gpus()
    image = EngineImage.objects.create(
        name="stand-in", reference="berth/stand-in:1", cpu_capable=True, is_stand_in=True
    )
    models = {team.slug: registered_model(team, tmp_path, name="tiny") for team in (team_a, team_b)}
    clients = [_client(alice if index % 2 == 0 else bob) for index in range(THREADS)]
    start = threading.Barrier(THREADS + 2)
    statuses: list[int] = []
    # Meanwhile the host's workers reserve and release GPUs for the teams' other deployments,
    # as launch and stop jobs do.
    running = [
        Deployment.objects.create(
            name="other", team=team, model=models[team.slug], host=host, image=image, gpu_count=1
        )
        for team in (team_a, team_b)
    ]
    gpus = list(host.gpus.order_by("index"))
    storm_over = threading.Event()
    job_errors: list[BaseException] = []

    def launch_jobs(index: int) -> None:
        deployment = Deployment.objects.get(pk=running[index].pk)
        try:
            start.wait()
            while not storm_over.is_set():
                reserve(deployment, [gpus[index]])
                release(deployment, reason="test")
        except BaseException as exc:  # collected and asserted below
            job_errors.append(exc)
        finally:
            connections.close_all()

    def deploy(index: int) -> None:
        team = "team-a" if index % 2 == 0 else "team-b"
        body = {
            "team": team,
            "model": models[team].pk,
            "host": host.name,
            "image": image.name,
            "name": "same-name",
            "gpu_count": 0,
        }
        try:
            start.wait()
            response = clients[index].post(
                "/deployments/api/", body, content_type="application/json"
            )
            statuses.append(response.status_code)
            if response.status_code == 503:
                assert int(response["Retry-After"]) >= 1
        finally:
            connections.close_all()

    jobs = [threading.Thread(target=launch_jobs, args=(index,)) for index in range(2)]
    threads = [threading.Thread(target=deploy, args=(index,)) for index in range(THREADS)]
    for thread in jobs + threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    storm_over.set()
    for thread in jobs:
        thread.join(timeout=60)
    assert job_errors == [], job_errors[:3]
    counts = Counter(statuses)
    assert len(statuses) == THREADS
    assert counts[500] == 0, counts
    assert set(counts) <= {201, 409, 503}, counts
    assert counts[201] == 2, counts  # one per team
    assert Deployment.objects.filter(name="same-name").count() == 2
    rows = AuditEvent.objects.filter(action=Action.DEPLOYMENT_LAUNCH_REQUESTED)
    assert rows.count() == THREADS, Counter(rows.values_list("outcome", flat=True))


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_finding_03_reserving_while_others_record_for_the_team_does_not_deadlock(
    alice: User, tmp_path: Path
) -> None:
    """The launch jobs' deadlock: ``reserve()`` locked the team row and then wanted the chain
    lock, while ``record()`` held the chain lock and wanted the team row for its foreign key."""
    team = alice.teams.get()
    host = host_with_gpus(count=4)
    image = EngineImage.objects.create(name="vllm", reference="vllm/vllm-openai:v0.11.0")
    model = registered_model(team, tmp_path)
    deployments = [
        Deployment.objects.create(
            name=f"d{index}", team=team, model=model, host=host, image=image, gpu_count=1
        )
        for index in range(3)
    ]
    gpus = list(host.gpus.order_by("index"))
    errors: list[BaseException] = []
    stop = time.monotonic() + RACE_SECONDS
    rounds = Counter()

    def reserver(index: int) -> None:
        deployment = Deployment.objects.get(pk=deployments[index].pk)
        try:
            while time.monotonic() < stop:
                reserve(deployment, [gpus[index]])
                release(deployment, reason="test")
                rounds["reserved"] += 1
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)
        finally:
            connections.close_all()

    def recorder() -> None:
        try:
            while time.monotonic() < stop:
                audit.record(Action.TEAM_QUOTA_CHANGED, team=team, quota=None)
                rounds["recorded"] += 1
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=reserver, args=(index,)) for index in range(3)]
    threads += [threading.Thread(target=recorder) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [], errors[:3]
    assert rounds["reserved"] > 10
    assert rounds["recorded"] > 10


def test_finding_03_the_lock_order_is_written_down() -> None:
    assert "Lock order" in trail.__doc__
    assert "chain lock" in trail.__doc__


def _hold_team_lock(team_pk: int, seconds: float, held: threading.Event) -> threading.Thread:
    """Another connection locks the team row for ``seconds``."""

    def hold() -> None:
        try:
            with transaction.atomic():
                Team.objects.select_for_update().get(pk=team_pk)
                held.set()
                time.sleep(seconds)
        finally:
            connections.close_all()

    thread = threading.Thread(target=hold)
    thread.start()
    assert held.wait(10)
    return thread


def _lock_team_nowait(team_pk: int) -> int:
    with transaction.atomic():
        return Team.objects.select_for_update(nowait=True).get(pk=team_pk).pk


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_finding_03_work_rolled_back_by_a_lock_is_retried_then_answered_503(
    alice: User, rf: Any
) -> None:
    team = alice.teams.get()
    # Released while the retries back off: the work succeeds on a later attempt.
    holder = _hold_team_lock(team.pk, 0.12, threading.Event())
    assert retrying(lambda: _lock_team_nowait(team.pk)) == team.pk
    holder.join()
    # Held past every retry: Contended, which the middleware answers with 503 and audits.
    holder = _hold_team_lock(team.pk, 3.0, threading.Event())
    with pytest.raises(Contended) as contended:
        retrying(lambda: _lock_team_nowait(team.pk))
    holder.join()
    assert is_contention(contended.value.__cause__)
    request = rf.post("/deployments/api/")
    response = ContentionMiddleware(lambda _: HttpResponse()).process_exception(
        request, contended.value.__cause__
    )
    assert response.status_code == 503
    assert response["Retry-After"] == "2"
    event = AuditEvent.objects.get(action="request.contended")
    assert (event.outcome, event.payload["path"]) == ("failed", "/deployments/api/")
