"""The scaler's scale-up on GPU hosts, on recorded GPU readings (no GPU can exist here): the
same placement, quota and allocation as a request, foreign processes subtracted. The hosts are
public nvidia-smi captures stored by the inventory, as in ``tests/test_replicas.py``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from accounts.models import Team, User
from core.queues import get_queue
from deployments.models import Deployment
from deployments.scaling import actions
from deployments.scaling.policy import PolicyChange, set_policy
from deployments.states import State
from gpus.models import Host
from tests.deployment_builders import registered_model
from tests.model_dirs import write_model
from tests.test_replicas import A5000_X2_BUSY, H100_X8, RTX_2080TI_X2, ask, hold, online_host

pytestmark = [pytest.mark.django_db, pytest.mark.redis]


@pytest.fixture
def h100() -> Host:
    """8 idle H100 80GB (a public capture)."""
    return online_host("h100", H100_X8)


@pytest.fixture
def small() -> Host:
    """2 idle RTX 2080 Ti, 11 GiB each."""
    return online_host("small", RTX_2080TI_X2)


@pytest.fixture
def llama(team_a: Team, tmp_path: Any) -> Any:
    """Team A's tiny Llama, on disk and registered."""
    write_model(tmp_path / "team-a" / "llama")
    return registered_model(team_a, tmp_path)


@pytest.fixture
def queues(redis_client: Any) -> Iterator[None]:
    """The host queues of these tests start and end empty."""
    names = ("host:h100", "host:small", "host:busy-only")
    for name in names:
        get_queue(name).empty()
    yield
    for name in names:
        get_queue(name).empty()


def scaled(user: User, model: Any, host: Host) -> Deployment:
    first = ask(user, model, replicas=1, host=host)
    set_policy(user, first, PolicyChange(autoscale=True, min_replicas=1, max_replicas=3))
    first.refresh_from_db()
    return first


def test_a_scaled_up_replica_is_placed_on_free_gpus_of_another_online_host(
    alice: User, llama: Any, h100: Host, small: Host, queues: None
) -> None:
    first = scaled(alice, llama, h100)
    hold(first)  # its launch took a GPU of the H100 host
    second = actions.add_replica(first, "test")
    assert second.replica_of_id == first.pk
    assert second.replica_index == 1
    assert second.state == State.QUEUED
    assert second.gpu_count == first.gpu_count
    # The 2080 Ti host fits the tiny Llama too and has no replica yet: spread over hosts.
    assert second.host == small
    held = {gpu.pk for gpu in hold(second)} | {a.gpu_id for a in first.allocations.all()}
    assert len(held) == 2  # distinct GPUs, the database's one active allocation per GPU


def test_gpus_held_by_foreign_processes_block_the_scale_up_with_the_reason(
    alice: User, llama: Any, queues: None
) -> None:
    only = online_host("busy-only", A5000_X2_BUSY)
    first = ask(alice, llama, replicas=1, host=only, gpu_count=1, override_reason="")
    set_policy(alice, first, PolicyChange(autoscale=True, min_replicas=1, max_replicas=2))
    with pytest.raises(actions.Blocked) as blocked:
        actions.add_replica(first, "test")
    assert "busy-only" in str(blocked.value)
    assert Deployment.objects.filter(replica_of=first).count() == 0


def test_the_team_gpu_quota_blocks_the_scale_up(
    alice: User, llama: Any, h100: Host, team_a: Team, queues: None
) -> None:
    first = scaled(alice, llama, h100)
    hold(first)
    Team.objects.filter(pk=team_a.pk).update(gpu_quota=1)
    with pytest.raises(actions.Blocked) as blocked:
        actions.add_replica(first, "test")
    assert "quota exceeded" in str(blocked.value)
    assert Deployment.objects.filter(replica_of=first).count() == 0
