"""The scaling policy as people edit it (service and page), within the team's quota and
audited, and the ``idle`` state's place in the lifecycle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.test import Client

from accounts.models import Team, User
from audit.actions import Action
from audit.models import AuditEvent
from deployments import services
from deployments.models import Deployment, GpuAllocation
from deployments.runtime.host_memory import GIB
from deployments.scaling import scaler
from deployments.scaling.policy import PolicyChange, set_policy
from deployments.states import State, TransitionError, check_transition
from tests.deployment_builders import deployment, host_with_gpus, registered_model
from tests.gateway_process import walk

pytestmark = pytest.mark.django_db


@pytest.fixture
def llama(team_a: Team, tmp_path: Path) -> Deployment:
    """Team A's ready one-GPU deployment on a 4-GPU host (its GPU held)."""
    host = host_with_gpus()
    built = deployment(team_a, registered_model(team_a, tmp_path), host)
    GpuAllocation.objects.create(deployment=built, gpu=host.gpus.first(), generation=1)
    walk(built, State.READY)
    return built


def policy(**values: Any) -> PolicyChange:
    return PolicyChange(**{"autoscale": True, "min_replicas": 1, "max_replicas": 3, **values})


def last(action: Action) -> AuditEvent:
    return AuditEvent.objects.filter(action=action).order_by("-seq").first()


def test_a_policy_is_stored_on_the_timeline_and_audited_with_old_and_new(
    alice: User, llama: Deployment
) -> None:
    set_policy(alice, llama, policy(min_replicas=2, target_waiting=4))
    llama.refresh_from_db()
    assert (llama.autoscale, llama.min_replicas, llama.max_replicas) == (True, 2, 3)
    assert llama.replicas == 2  # moved inside the new bounds at once
    event = llama.events.get(data__scaling="policy")
    assert event.message.startswith("scaling policy changed by alice: 2-3 replicas, up past 4")
    audited = last(Action.DEPLOYMENT_SCALING_POLICY_CHANGED)
    assert audited.outcome == "ok"
    assert audited.payload["old"]["autoscale"] is False
    assert audited.payload["new"]["min_replicas"] == 2


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"min_replicas": 4}, "min_replicas"),
        ({"max_replicas": 0}, "max_replicas"),
        ({"max_replicas": 17}, "max_replicas"),
        ({"target_kv_cache": 1.5}, "target_kv_cache"),
        ({"target_waiting": 0}, "target_waiting"),
        ({"scale_up_window_s": 60, "scale_down_window_s": 30}, "scale_down_window_s"),
    ],
)
def test_a_policy_outside_the_rules_is_refused_naming_the_field_and_audited(
    alice: User, llama: Deployment, values: dict, field: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        set_policy(alice, llama, policy(**values))
    assert field in refused.value.message_dict
    assert last(Action.DEPLOYMENT_SCALING_POLICY_CHANGED).outcome == "denied"
    llama.refresh_from_db()
    assert llama.autoscale is False


def test_the_maximum_must_fit_the_teams_gpu_quota(
    alice: User, llama: Deployment, team_a: Team
) -> None:
    Team.objects.filter(pk=team_a.pk).update(gpu_quota=2)
    with pytest.raises(ValidationError) as refused:
        set_policy(alice, llama, policy(max_replicas=3))
    assert "at most 2 replicas" in refused.value.message_dict["max_replicas"][0]
    set_policy(alice, llama, policy(max_replicas=2))


def test_the_minimum_must_fit_what_the_teams_other_cpu_engines_leave_of_its_memory_quota(
    alice: User, llama: Deployment, team_a: Team
) -> None:
    Deployment.objects.filter(pk=llama.pk).update(gpu_count=0, host_memory_bytes=4 * GIB)
    other = deployment(team_a, llama.model, llama.host, name="other", gpu_count=0)
    Deployment.objects.filter(pk=other.pk).update(host_memory_bytes=8 * GIB)
    walk(other, State.READY)
    Team.objects.filter(pk=team_a.pk).update(host_memory_quota_gib=16)
    llama.refresh_from_db()
    with pytest.raises(ValidationError) as refused:
        set_policy(alice, llama, policy(min_replicas=3, max_replicas=4))
    assert "a minimum of at most 2 fits now" in refused.value.message_dict["min_replicas"][0]
    with pytest.raises(ValidationError) as too_many:
        set_policy(alice, llama, policy(max_replicas=5))
    assert "at most 4 replicas" in too_many.value.message_dict["max_replicas"][0]
    set_policy(alice, llama, policy(min_replicas=2, max_replicas=4))


def test_another_teams_member_cannot_change_it(bob: User, llama: Deployment) -> None:
    with pytest.raises(PermissionDenied):
        set_policy(bob, llama, policy())
    assert last(Action.DEPLOYMENT_SCALING_POLICY_CHANGED).outcome == "denied"


def test_the_page_saves_the_policy_and_shows_refusals_by_field(
    alice: User, llama: Deployment
) -> None:
    client = Client()
    client.force_login(alice)
    url = f"/deployments/{llama.public_id}/scaling/"
    page = client.get(url)
    assert page.status_code == 200
    assert "Autoscaling off." in page.content.decode()
    form = {
        "autoscale": "on", "min_replicas": "0", "max_replicas": "2", "target_waiting": "2",
        "target_kv_cache": "0.8", "scale_up_window_s": "30", "scale_down_window_s": "300",
        "idle_after_s": "600",
    }  # fmt: skip
    assert client.post(url, form).status_code == 302
    llama.refresh_from_db()
    assert (llama.min_replicas, llama.max_replicas, llama.idle_after_s) == (0, 2, 600)
    refused = client.post(url, {**form, "scale_down_window_s": "10"})
    assert refused.status_code == 200
    assert "at least the scale-up window" in refused.content.decode()
    detail = client.get(f"/deployments/{llama.public_id}/").content.decode()
    assert url in detail  # the panel is loaded into the deployment page


def test_idle_sits_between_stopping_and_a_wake_or_a_stop() -> None:
    check_transition(State.STOPPING, State.IDLE)
    check_transition(State.IDLE, State.QUEUED)
    check_transition(State.IDLE, State.STOPPED)
    for new in (State.READY, State.LOADING, State.FAILED, State.STOPPING):
        with pytest.raises(TransitionError):
            check_transition(State.IDLE, new)


def test_a_user_stops_an_idle_deployment_straight_to_stopped(
    alice: User, llama: Deployment
) -> None:
    set_policy(alice, llama, policy(min_replicas=0))
    Deployment.objects.filter(pk=llama.pk).update(replicas=0)
    llama.refresh_from_db()
    assert llama.transition(State.STOPPING)
    assert llama.transition(State.IDLE)
    services.request_stop(alice, llama)
    llama.refresh_from_db()
    assert llama.state == State.STOPPED
    assert llama.replicas == 1  # a later restart is a deployment of one replica again


@pytest.mark.redis
def test_after_a_replica_failed_the_scaler_adds_none_for_a_while_and_says_why(
    alice: User, llama: Deployment
) -> None:
    set_policy(alice, llama, policy(min_replicas=2, max_replicas=2))
    llama.refresh_from_db()
    broken = deployment(llama.team, llama.model, llama.host, gpu_count=1)
    Deployment.objects.filter(pk=broken.pk).update(replica_of=llama, replica_index=1)
    broken.refresh_from_db()
    walk(broken, State.FAILED)
    scaler.converge(llama)
    scaler.converge(llama)  # a second look: the same reason is not audited again
    llama.refresh_from_db()
    assert "replica 2 failed at" in llama.scaling_blocked
    assert "the engine exited with code 1" in llama.scaling_blocked
    assert llama.group().count() == 2  # no replica added
    blocked = AuditEvent.objects.filter(action=Action.DEPLOYMENT_SCALE_BLOCKED)
    assert blocked.count() == 1
