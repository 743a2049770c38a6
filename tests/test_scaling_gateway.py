"""What the gateway's routing table says about scaling: an idle deployment is a route (held and
woken, not refused), a blocked scale-up travels with the route into the 503s, and what a
gateway tells the scaler (its demand in Redis) is read back summed over gateways."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from redis import Redis

from accounts.models import Team
from deployments.models import Deployment
from deployments.scaling import signals
from deployments.states import State
from gateway import cache, errors
from gateway.app import Demand, _not_ready
from tests.deployment_builders import deployment, host_with_gpus, registered_model
from tests.gateway_process import walk

pytestmark = pytest.mark.django_db


@pytest.fixture
def idle(team_a: Team, tmp_path: Path) -> Deployment:
    """Team A's deployment ``llama`` scaled to zero by its scaler."""
    built = deployment(team_a, registered_model(team_a, tmp_path), host_with_gpus())
    walk(built, State.READY)
    Deployment.objects.filter(pk=built.pk).update(autoscale=True, min_replicas=0, replicas=0)
    built.refresh_from_db()
    assert built.transition(State.STOPPING)
    assert built.transition(State.IDLE)
    return built


def test_an_idle_deployment_is_a_route_that_waits_and_names_what_blocks_its_wake(
    idle: Deployment, team_a: Team
) -> None:
    route = cache.load().routes[(team_a.pk, "llama")]
    assert [b.state for b in route.idle] == [State.IDLE]
    assert route.waiting  # held, not refused
    assert not route.ready
    assert route.blocked == ""
    Deployment.objects.filter(pk=idle.pk).update(scaling_blocked="quota exceeded: team team-a")
    route = cache.load().routes[(team_a.pk, "llama")]
    assert route.blocked == "quota exceeded: team team-a"
    body = json.loads(_not_ready("llama", route).body())["error"]
    assert body["code"] == "model_not_ready"
    assert "scaling blocked: quota exceeded" in body["message"]
    woken = json.loads(_not_ready("llama", route, "cannot wake: no room").body())["error"]
    assert "cannot wake: no room" in woken["message"]


def test_an_overloaded_answer_says_when_scaling_up_is_blocked() -> None:
    plain = json.loads(errors.overloaded("llama", "model_overloaded").body())["error"]
    assert plain["message"] == "Every replica of `llama` is busy; try again shortly."
    blocked = errors.overloaded("llama", "model_overloaded", "no free GPUs on gpu-01")
    message = json.loads(blocked.body())["error"]["message"]
    assert message.endswith("Scaling up is blocked: no free GPUs on gpu-01")


@pytest.mark.redis
def test_the_gateways_demand_is_summed_and_a_silent_gateways_queue_stops_counting(
    redis_client: Redis,
) -> None:
    now = time.time()
    one, two = Demand(), Demand()
    one.arrived((7, "llama"), now - 10)
    one.hold((7, "llama"), 2)
    two.arrived((7, "llama"), now)
    for gateway, queued in ((one, {}), (two, {(7, "llama"): 3})):
        signals.write_demand(redis_client, gateway.gateway_id, gateway.figures(queued))
    demand = signals.read_demand(7, "llama")
    assert demand.queued == 5
    assert demand.last_request_at == pytest.approx(now)
    entries = redis_client.hgetall(signals.demand_key(7, "llama")).values()
    stale = signals.demand_of(entries, now=10**10)
    assert stale.queued == 0  # its writer went quiet: what it held is not waiting any more
    assert stale.last_request_at == pytest.approx(now)
