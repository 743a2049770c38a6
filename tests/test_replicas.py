"""Replicas below the web layer: placement over hosts whose GPUs come from real nvidia-smi
captures (stored by the inventory as the agent stores them), the request's refusals, the GPUs
each replica's launch reserves, stop/restart/delete of the group, and that every replica's row
launches, is watched, reconciled, collected and deleted on its own host.

Hosts (``tests/fixtures/gpu/public/SOURCES.md`` says where each capture comes from):
``h100`` 8 idle H100 80GB; ``small`` 2 idle RTX 2080 Ti 11 GiB; ``busy`` 2 RTX A5000 24 GiB,
both held by a foreign llama-server process (22 and 17 GiB).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import Team, User
from audit.models import AuditEvent
from core import naming
from core.queues import get_queue
from deployments import services
from deployments.models import Deployment, EngineImage, GpuAllocation
from deployments.runtime import allocation, jobs, launcher
from deployments.runtime.engine_host import EngineHost
from deployments.runtime.reconcile import reconcile_host
from deployments.states import State
from deployments.validation import DeployRequest
from gpus import inventory
from gpus.hosts import register_host
from gpus.models import Host
from gpus.parsers import parse_any
from gpus.readings import Collection
from tests.deployment_builders import engine_image, registered_model
from tests.model_dirs import write_model

pytestmark = pytest.mark.django_db

CAPTURES = Path(__file__).parent / "fixtures" / "gpu" / "public"
CONFIGS = Path(__file__).parent / "fixtures" / "model_configs"
H100_X8 = "query-gpu-8x-h100-nounits.csv"
RTX_2080TI_X2 = "rtx-2080ti-x2-ecc-unsupported-q.xml"
A5000_X2_BUSY = "rtx-a5000-x2-v13-q.xml"


def online_host(name: str, capture: str) -> Host:
    """A registered host whose agent has just reported ``capture`` and its heartbeat."""
    host = register_host(name)[0]
    reading = parse_any((CAPTURES / capture).read_text())
    inventory.store_collection(host, Collection(reading), timezone.now())
    inventory.heartbeat(host)
    host.refresh_from_db()
    return host


@pytest.fixture
def h100() -> Host:
    """8 idle H100 80GB (a public capture)."""
    return online_host("h100", H100_X8)


@pytest.fixture
def small() -> Host:
    """2 idle RTX 2080 Ti, 11 GiB each."""
    return online_host("small", RTX_2080TI_X2)


@pytest.fixture
def busy() -> Host:
    """2 RTX A5000 held by a foreign llama-server (22 GiB and 17 GiB of 24 GiB)."""
    return online_host("busy", A5000_X2_BUSY)


@pytest.fixture
def llama(team_a: Team, tmp_path: Path) -> Any:
    """Team A's tiny Llama, on disk and registered."""
    write_model(tmp_path / "team-a" / "llama")
    return registered_model(team_a, tmp_path)


@pytest.fixture
def queues(redis_client: Any) -> Iterator[None]:
    """The host queues of these tests start and end empty."""
    names = ("host:h100", "host:small", "host:busy", "host:local")
    for name in names:
        get_queue(name).empty()
    yield
    for name in names:
        get_queue(name).empty()


def ask(user: User, model: Any, *, replicas: int, host: Host | None = None, **extra: Any) -> Any:
    """``services.request_deployment`` as the form sends it, its launches enqueued on commit."""
    data = DeployRequest(
        team=model.team,
        model=model,
        host=host,
        image=extra.pop("image", None) or engine_image(),
        name=extra.pop("name", "llama"),
        gpu_count=extra.pop("gpu_count", 1),
        replicas=replicas,
        **extra,
    )
    return services.request_deployment(user, data)


def group_of(deployment: Deployment) -> list[Deployment]:
    return list(deployment.group().select_related("host"))


def queued_ids(*hosts: Host) -> dict[str, list[str]]:
    return {host.name: get_queue(host.queue_name).job_ids for host in hosts}


def run_queued(queue: Any, job_id: str) -> Any:
    """Run a queued job's function with the arguments it was enqueued with (as its worker
    would, in this process: the test's database connection stays open)."""
    job = queue.fetch_job(job_id)
    return job.func(*job.args, **job.kwargs)


def hold(row: Deployment) -> list[Any]:
    """The launch's own GPU reservation for ``row`` (``launcher._hold_gpus``): chosen on its
    host from the stored readings and inserted under the partial unique constraint."""
    fresh = Deployment.objects.select_related("host", "team").get(pk=row.pk)
    return launcher._hold_gpus(fresh, [])


# --- placement --------------------------------------------------------------------------------


@pytest.mark.redis
def test_three_replicas_over_two_hosts_spread_two_and_one_on_distinct_gpus(
    alice: User,
    llama: Any,
    h100: Host,
    small: Host,
    queues: None,
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        first = ask(alice, llama, replicas=3)
    rows = group_of(first)
    assert [(row.replica_index, row.host.name) for row in rows] == [
        (0, "h100"),
        (1, "small"),
        (2, "h100"),
    ]
    assert [row.replicas for row in rows] == [3, 1, 1]
    assert first.replica_of is None
    assert {row.replica_of_id for row in rows[1:]} == {first.pk}
    assert all(row.state == State.QUEUED for row in rows)
    # Each replica's launch is on its own host's queue.
    assert queued_ids(h100, small) == {
        "h100": [f"launch-{rows[0].pk}-1", f"launch-{rows[2].pk}-1"],
        "small": [f"launch-{rows[1].pk}-1"],
    }
    # The launches reserve distinct GPUs (h100's two replicas on two different H100s).
    held = [hold(row) for row in rows]
    # (this capture's nvidia-smi query has no uuid column: GPUs are told apart by index)
    gpu_rows = [gpu.pk for gpus in held for gpu in gpus]
    assert len(gpu_rows) == len(set(gpu_rows)) == 3
    assert [gpus[0].host.name for gpus in held] == ["h100", "small", "h100"]
    event = AuditEvent.objects.get(action="deployment.launch_requested", outcome="ok")
    assert event.payload["replicas"] == 3
    assert event.payload["hosts"] == ["h100", "small", "h100"]


def test_a_host_whose_gpus_are_too_small_gets_no_replica(
    alice: User, llama: Any, h100: Host, small: Host, queues: None
) -> None:
    """Qwen3-32B (64 GB of BF16 weights) is planned again for each host: it fits one H100 and
    not the two 11 GiB cards together, so both replicas go to the H100 host."""
    llama.config = json.loads((CONFIGS / "qwen3-32b.json").read_text())
    llama.save()
    first = ask(alice, llama, replicas=2, gpu_count=None)
    rows = group_of(first)
    assert [row.host.name for row in rows] == ["h100", "h100"]
    assert all(row.stored_plan.fits for row in rows)
    with pytest.raises(ValidationError) as refused:
        ask(alice, llama, replicas=1, gpu_count=None, host=small, name="on-small")
    assert "does not fit" in " ".join(refused.value.message_dict["gpu_count"])


def test_more_replicas_than_the_fitting_hosts_hold_is_refused_with_each_hosts_reason(
    alice: User, llama: Any, h100: Host, small: Host, queues: None
) -> None:
    llama.config = json.loads((CONFIGS / "qwen3-32b.json").read_text())
    llama.save()
    with pytest.raises(ValidationError) as refused:
        ask(alice, llama, replicas=5, gpu_count=None)
    message = " ".join(refused.value.message_dict["replicas"])
    # Its full 40,960-token context needs two H100s per replica: four fit the eight.
    assert "only 4 of 5 replicas" in message
    assert "small:" in message  # why the small host took none
    assert not Deployment.objects.exists()


def test_gpus_held_by_foreign_processes_are_not_counted(
    alice: User, llama: Any, busy: Host, small: Host, queues: None
) -> None:
    first = ask(alice, llama, replicas=2)
    assert [row.host.name for row in group_of(first)] == ["small", "small"]
    with pytest.raises(ValidationError) as refused:
        ask(alice, llama, replicas=3, name="three")
    message = " ".join(refused.value.messages)
    assert "only 2 of 3 replicas" in message
    assert "busy:" in message
    assert "llama-server" in message  # the foreign process is named
    assert Deployment.objects.filter(name="three").count() == 0


def test_a_host_whose_agent_went_quiet_gets_no_replica(
    alice: User, llama: Any, h100: Host, small: Host, queues: None
) -> None:
    quiet_since = timezone.now() - timezone.timedelta(minutes=10)
    reading = parse_any((CAPTURES / H100_X8).read_text())
    inventory.store_collection(h100, Collection(reading), quiet_since)
    first = ask(alice, llama, replicas=2)
    assert [row.host.name for row in group_of(first)] == ["small", "small"]
    with pytest.raises(ValidationError) as refused:
        ask(alice, llama, replicas=3, name="three")
    assert "only 2 of 3 replicas" in " ".join(refused.value.messages)


def test_the_team_quota_refuses_replicas_that_together_exceed_it(
    alice: User, llama: Any, h100: Host, team_a: Team, queues: None
) -> None:
    Team.objects.filter(pk=team_a.pk).update(gpu_quota=2)
    llama.team.refresh_from_db()
    with pytest.raises(ValidationError) as refused:
        ask(alice, llama, replicas=3)
    assert "quota exceeded" in " ".join(refused.value.message_dict["replicas"])
    assert "this plan needs 3" in " ".join(refused.value.message_dict["replicas"])
    denied = AuditEvent.objects.get(action="deployment.launch_requested")
    assert denied.outcome == "denied"
    assert "replicas" in denied.payload["reason"]
    assert not Deployment.objects.exists()
    assert queued_ids(h100) == {"h100": []}
    two = group_of(ask(alice, llama, replicas=2))  # 2 fit the quota
    # The quota is checked again per replica when its launch reserves: lowered meanwhile to
    # 1, the first replica's launch gets its GPU and the second's is refused.
    Team.objects.filter(pk=team_a.pk).update(gpu_quota=1)
    assert len(hold(two[0])) == 1
    with pytest.raises(launcher.LaunchFailure, match="quota exceeded: team team-a uses 1 of 1"):
        hold(two[1])


@pytest.mark.redis
def test_a_refused_request_leaves_nothing_half_written(
    alice: User, llama: Any, h100: Host, queues: None, django_capture_on_commit_callbacks: Any
) -> None:
    """An older ``llama`` whose first replica failed while its second still serves: a new
    ``llama`` is refused, whatever its replica count, and nothing of it stays (no row, no
    launch, no hold), only the denial."""
    with django_capture_on_commit_callbacks(execute=True):
        old = ask(alice, llama, replicas=2)
    get_queue(h100.queue_name).empty()
    primary, second = group_of(old)
    for row in (primary, second):
        for step in (State.LAUNCHING, State.LOADING):
            row.transition(step)
    second.transition(State.READY)
    launcher.fail(primary, "the engine exited with code 1", [])
    rows_before = Deployment.objects.count()
    for count in (2, 1):
        with django_capture_on_commit_callbacks(execute=True), pytest.raises(ValidationError) as no:
            ask(alice, llama, replicas=count)
        assert "already deploying or running llama" in " ".join(no.value.message_dict["name"])
        assert Deployment.objects.count() == rows_before
        assert queued_ids(h100) == {"h100": []}
    denials = AuditEvent.objects.filter(action="deployment.launch_requested", outcome="denied")
    assert denials.count() == 2
    accepted = AuditEvent.objects.filter(action="deployment.launch_requested", outcome="ok")
    assert accepted.count() == 1


def test_two_replicas_launched_on_one_host_reserve_distinct_gpus(
    alice: User, llama: Any, h100: Host, queues: None
) -> None:
    first = ask(alice, llama, replicas=2, gpu_count=2, host=h100)
    primary, second = group_of(first)
    one, two = hold(primary), hold(second)
    assert len(one) == len(two) == 2
    assert not {gpu.pk for gpu in one} & {gpu.pk for gpu in two}
    # Handing the second replica the first one's GPUs is refused (all or none)...
    with pytest.raises(allocation.AllocationConflict):
        allocation.reserve(second, one)
    # ...and the database itself refuses a second active allocation of a GPU.
    with pytest.raises(IntegrityError), transaction.atomic():
        GpuAllocation.objects.create(deployment=second, gpu=one[0], generation=1)
    assert GpuAllocation.objects.filter(active=True).count() == 4


# --- the group's actions ----------------------------------------------------------------------


def _walk(row: Deployment, to: State) -> None:
    for step in (State.LAUNCHING, State.LOADING, State.READY):
        row.transition(step)
        if step == to:
            return


@pytest.mark.redis
@pytest.mark.docker
def test_stop_restart_and_delete_act_on_the_group(
    alice: User,
    llama: Any,
    h100: Host,
    small: Host,
    queues: None,
    docker_client: Any,
    django_capture_on_commit_callbacks,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        first = ask(alice, llama, replicas=3)
    for row in group_of(first):
        hold(row)
        _walk(row, State.READY)
    for host in (h100, small):
        get_queue(host.queue_name).empty()
    _, failing, _ = group_of(first)
    launcher.fail(failing, "the engine exited with code 1", [], release=True)

    # Restart while one replica failed and the others serve: only the failed one starts again.
    first.refresh_from_db()
    with django_capture_on_commit_callbacks(execute=True):
        services.request_restart(alice, first)
    rows = group_of(first)
    assert [(row.state, row.generation) for row in rows] == [
        (State.READY, 1),
        (State.QUEUED, 2),
        (State.READY, 1),
    ]
    assert queued_ids(h100, small) == {"h100": [], "small": [f"launch-{failing.pk}-2"]}
    get_queue(small.queue_name).empty()

    # Stop: every running replica, each on its own host's queue.
    first.refresh_from_db()
    with django_capture_on_commit_callbacks(execute=True):
        services.request_stop(alice, first)
    rows = group_of(first)
    assert {row.state for row in rows} == {State.STOPPING}
    assert queued_ids(h100, small) == {
        "h100": [f"stop-{rows[0].pk}-1", f"stop-{rows[2].pk}-1"],
        "small": [f"stop-{rows[1].pk}-2"],
    }
    for row in rows:
        jobs.stop_job(row.pk, row.generation)
    assert {row.state for row in group_of(first)} == {State.STOPPED}
    assert not GpuAllocation.objects.filter(active=True).exists()
    for host in (h100, small):
        get_queue(host.queue_name).empty()

    # Restart of the stopped group: every replica, a new generation each.
    first.refresh_from_db()
    with django_capture_on_commit_callbacks(execute=True):
        services.request_restart(alice, first)
    rows = group_of(first)
    assert [(row.state, row.generation) for row in rows] == [
        (State.QUEUED, 2),
        (State.QUEUED, 3),
        (State.QUEUED, 2),
    ]
    queued = queued_ids(h100, small)
    assert sorted(queued["h100"] + queued["small"]) == sorted(
        f"launch-{row.pk}-{row.generation}" for row in rows
    )


@pytest.mark.redis
def test_restart_of_a_group_refuses_what_the_quota_cannot_hold_together(
    alice: User, llama: Any, h100: Host, team_a: Team, queues: None
) -> None:
    first = ask(alice, llama, replicas=2)
    for row in group_of(first):
        _walk(row, State.LOADING)
        launcher.fail(row, "the engine exited with code 1", [])
    Team.objects.filter(pk=team_a.pk).update(gpu_quota=1)
    first.refresh_from_db()
    with pytest.raises(ValidationError) as refused:
        services.request_restart(alice, first)
    assert "quota exceeded" in " ".join(refused.value.message_dict["replicas"])
    assert {(row.state, row.generation) for row in group_of(first)} == {(State.FAILED, 1)}
    assert queued_ids(h100) == {"h100": []}


def test_restart_of_a_group_whose_name_another_deployment_took_is_refused_cleanly(
    alice: User, llama: Any, h100: Host, queues: None
) -> None:
    old = ask(alice, llama, replicas=2)
    for row in group_of(old):
        _walk(row, State.LOADING)
        launcher.fail(row, "the engine exited with code 1", [])
    newer = ask(alice, llama, replicas=1)  # the name is free again: nothing of old runs
    old.refresh_from_db()
    with pytest.raises(ValidationError) as refused:
        services.request_restart(alice, old)
    assert "llama" in " ".join(refused.value.message_dict["name"])
    assert {(row.state, row.generation) for row in group_of(old)} == {(State.FAILED, 1)}
    assert newer.group().get().state == State.QUEUED
    denied = AuditEvent.objects.get(action="deployment.restart_requested")
    assert denied.outcome == "denied"


# --- the migration ----------------------------------------------------------------------------


def test_a_deployment_made_without_replicas_is_one_replica(
    team_a: Team, llama: Any, h100: Host
) -> None:
    """What migration 0007 gives every existing row: its defaults make each deployment its own
    first replica of one; the database refuses a further replica without its first."""
    row = Deployment.objects.create(
        name="old", team=team_a, model=llama, host=h100, image=engine_image(), gpu_count=1
    )
    assert (row.replica_of_id, row.replica_index, row.replicas) == (None, 0, 1)
    assert list(row.group()) == [row]
    assert row.primary_id == row.pk
    assert not row.is_replica
    assert list(Deployment.objects.primaries()) == [row]
    with pytest.raises(IntegrityError), transaction.atomic():
        Deployment.objects.create(
            name="old", team=team_a, model=llama, host=h100, image=engine_image(),
            gpu_count=1, replica_index=1,
        )  # fmt: skip


# --- each replica's own launch, watch, reconcile, gc and delete -------------------------------


@pytest.fixture
def stand_in(engine_image: str) -> EngineImage:
    """The stand-in engine on the allow-list (CPU, loads in a second, holds no memory)."""
    return EngineImage.objects.create(
        name="stand-in",
        reference=engine_image,
        gpu_capable=False,
        cpu_capable=True,
        is_stand_in=True,
        health_command=["curl", "-fsS", "http://127.0.0.1:8000/health"],
        environment={"ENGINE_LOAD_SECONDS": "1"},
    )


@pytest.fixture
def local(db: None) -> Iterator[Host]:
    """This machine's Docker engine as an online host (no GPUs)."""
    host = register_host("local")[0]
    inventory.heartbeat(host)
    Host.objects.filter(pk=host.pk).update(status="online")
    host.refresh_from_db()
    return host


def _cleanup(docker_client: Any, pks: list[int]) -> None:
    from tests.deployment_builders import remove_engines

    remove_engines(docker_client, [Deployment(pk=pk) for pk in pks])


def _volumes(docker_client: Any, pks: list[int]) -> list[str]:
    names = {naming.cache_volume(pk, settings.BERTH_INSTANCE) for pk in pks}
    return sorted(v.name for v in docker_client.volumes.list() if v.name in names)


@pytest.mark.redis
@pytest.mark.docker
@pytest.mark.django_db(transaction=True)
def test_each_replica_launches_and_is_watched_on_its_own_row(
    alice: User, llama: Any, local: Host, stand_in: EngineImage, docker_client: Any, queues: None
) -> None:
    first = ask(alice, llama, replicas=2, host=local, image=stand_in, gpu_count=0)
    rows = group_of(first)
    pks = [row.pk for row in rows]
    try:
        for row in reversed(rows):  # the second replica first: nothing depends on the first
            assert jobs.launch_job(row.pk, 1) == "loading"
        deadline = time.monotonic() + 60
        while {row.state for row in group_of(first)} != {State.READY}:
            assert time.monotonic() < deadline, [r.last_error for r in group_of(first)]
            for row in group_of(first):
                if row.state == State.LOADING:
                    jobs.watch_job(row.pk, row.generation)
            time.sleep(0.2)
        rows = group_of(first)
        assert len({row.container_id for row in rows}) == 2
        assert len({row.host_port for row in rows}) == 2
        assert len({row.engine_key for row in rows}) == 2
        for row in rows:
            assert launcher.probe(settings.BERTH_ENGINE_BIND, row.host_port).state == "healthy"
            states = list(
                row.events.filter(kind="state").order_by("pk").values_list("state", flat=True)
            )
            assert states == ["queued", "launching", "loading", "ready"], (row, states)
        assert sorted(_volumes(docker_client, pks)) == sorted(
            naming.cache_volume(pk, settings.BERTH_INSTANCE) for pk in pks
        )

        # gc keeps every live replica's container and cache volume.
        result = jobs.gc_job(local.pk)
        names = {c.name for c in docker_client.containers.list(all=True)}
        assert {row.container_name for row in rows} <= names, result
        assert len(_volumes(docker_client, pks)) == 2

        first.refresh_from_db()
        services.request_stop(alice, first)
        for row in group_of(first):
            assert jobs.stop_job(row.pk, row.generation) == "stopped"
        first.refresh_from_db()
        queue = get_queue(local.queue_name)
        queue.empty()  # the launches, looks and stops run above
        services.request_delete(alice, first)
        assert queue.job_ids == [f"delete-{rows[1].pk}-1", f"delete-{rows[0].pk}-1"]
        # The worst order two hosts' agents can run the deletes in: the first replica's (its
        # row takes the others' with it) before the second's.
        results = [run_queued(queue, f"delete-{row.pk}-1") for row in rows]
        assert results[0] == "deleted"
        assert results[1].startswith("already deleted; removed 0 containers and the volume")
        assert not Deployment.objects.filter(pk__in=pks).exists()
        assert _volumes(docker_client, pks) == []
        ours = {"label": f"berth.instance={settings.BERTH_INSTANCE}"}
        mine = [
            c.name
            for c in docker_client.containers.list(all=True, filters=ours)
            if c.labels.get("berth.deployment") in {str(pk) for pk in pks}
        ]
        assert mine == []
    finally:
        _cleanup(docker_client, pks)


@pytest.mark.redis
@pytest.mark.docker
@pytest.mark.django_db(transaction=True)
def test_reconcile_resumes_the_lost_launch_of_the_second_replica(
    alice: User, llama: Any, local: Host, stand_in: EngineImage, docker_client: Any, queues: None
) -> None:
    first = ask(alice, llama, replicas=2, host=local, image=stand_in, gpu_count=0)
    primary, second = group_of(first)
    queue = get_queue(local.queue_name)
    assert queue.job_ids == [f"launch-{primary.pk}-1", f"launch-{second.pk}-1"]
    queue.remove(f"launch-{second.pk}-1")  # ...Redis lost the second replica's launch
    queue.fetch_job(f"launch-{second.pk}-1").delete()
    Deployment.objects.filter(pk__in=[primary.pk, second.pk]).update(
        updated=timezone.now() - timezone.timedelta(minutes=5)
    )
    result = reconcile_host(local, EngineHost(docker_client), resume=jobs.resume)
    assert result.jobs_resumed == [f"launch-{second.pk}-1"]
    assert queue.job_ids == [f"launch-{primary.pk}-1", f"launch-{second.pk}-1"]


@pytest.mark.redis
@pytest.mark.docker
def test_gc_removes_the_volume_a_lost_delete_job_left_and_keeps_every_recorded_one(
    alice: User,
    llama: Any,
    local: Host,
    docker_client: Any,
    queues: None,
    django_capture_on_commit_callbacks: Any,
) -> None:
    image = EngineImage.objects.create(
        name="stand-in",
        reference="berth-test/engine:stand-in",
        gpu_capable=False,
        cpu_capable=True,
        is_stand_in=True,
    )
    first = ask(alice, llama, replicas=2, host=local, image=image, gpu_count=0)
    other = ask(alice, llama, replicas=1, host=local, image=image, gpu_count=0, name="other")
    primary, second = group_of(first)
    pks = [primary.pk, second.pk, other.pk]
    for pk in pks:  # what each launch's container mount creates
        docker_client.volumes.create(
            name=naming.cache_volume(pk, settings.BERTH_INSTANCE),
            labels=naming.volume_labels(
                instance=settings.BERTH_INSTANCE, deployment_id=pk, team="team-a"
            ),
        )
    try:
        for row in (primary, second):
            launcher.fail(row, "the engine exited with code 1", [])
        first.refresh_from_db()
        with django_capture_on_commit_callbacks(execute=True):
            services.request_delete(alice, first)
        queue = get_queue(local.queue_name)
        # The first replica's delete runs; the second's job was lost with Redis.
        assert run_queued(queue, f"delete-{primary.pk}-1") == "deleted"
        assert not Deployment.objects.filter(pk=second.pk).exists()
        assert _volumes(docker_client, pks) == sorted(
            naming.cache_volume(pk, settings.BERTH_INSTANCE) for pk in (second.pk, other.pk)
        )
        jobs.gc_job(local.pk)
        assert _volumes(docker_client, pks) == [
            naming.cache_volume(other.pk, settings.BERTH_INSTANCE)  # recorded: kept
        ]
        ran = AuditEvent.objects.filter(action="gc.ran").latest("pk")
        assert ran.payload["volumes_removed"] == [
            naming.cache_volume(second.pk, settings.BERTH_INSTANCE)
        ]
    finally:
        _cleanup(docker_client, pks)


@pytest.mark.django_db(transaction=True)
def test_migration_0007_keeps_every_existing_deployment_as_one_replica() -> None:
    """Deployments made before replicas (at 0006) are, after 0007, each the first replica of
    one; the unique name still holds for their live rows."""
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    before, after = [("deployments", "0006_host_memory")], [("deployments", "0007_replicas")]
    executor = MigrationExecutor(connection)
    # Only deployments goes back (no other app's migration depends on its later ones).
    others = [node for node in executor.loader.graph.leaf_nodes() if node[0] != "deployments"]
    try:
        executor.migrate(before)
        old = executor.loader.project_state(others + before).apps
        team = old.get_model("accounts", "Team").objects.create(slug="team-a", name="Team A")
        mount = old.get_model("models_registry", "StorageMount").objects.create(
            name="store", canonical_prefix="/store", local_path="/s", host_path="/s",
            container_path="/models", kind="auto",
        )  # fmt: skip
        model = old.get_model("models_registry", "Model").objects.create(
            team=team, mount=mount, path="/store/team-a/llama", status="ok"
        )
        host = old.get_model("gpus", "Host").objects.create(name="gpu-01")
        image = old.get_model("deployments", "EngineImage").objects.create(
            name="vllm", reference="vllm/vllm-openai:v0.11.0"
        )
        made = [
            old.get_model("deployments", "Deployment")
            .objects.create(
                name=name,
                team=team,
                model=model,
                host=host,
                image=image,
                gpu_count=1,
                state=state,
            )
            .pk
            for name, state in (("serving", "ready"), ("stopped", "stopped"))
        ]
        executor = MigrationExecutor(connection)
        executor.migrate(after)
        new = MigrationExecutor(connection).loader.project_state(others + after).apps
        rows = new.get_model("deployments", "Deployment").objects.filter(pk__in=made)
        assert sorted(rows.values_list("name", "replica_of", "replica_index", "replicas")) == [
            ("serving", None, 0, 1),
            ("stopped", None, 0, 1),
        ]
        with pytest.raises(IntegrityError), transaction.atomic():
            new.get_model("deployments", "Deployment").objects.create(
                name="serving", team_id=team.pk, model_id=model.pk, host_id=host.pk,
                image_id=image.pk, gpu_count=1, state="queued",
            )  # fmt: skip
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
