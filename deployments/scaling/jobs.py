"""The scaler's jobs: the periodic look (``BERTH_SCALER_INTERVAL_S``, once for the console) and
the drain of a replica being scaled down, on its host's queue::

    enqueue_drain(row)   # after row went to ``stopping``: wait for its streams, then stop

A draining replica is no longer routed by the gateways (``stopping`` is not a route), so no new
request reaches it; the job waits until the engine reports no request running or waiting (two
readings in a row, ``DRAIN_POLL_S`` apart, so a request the gateway sent just before the route
changed is seen), or ``BERTH_SCALE_DRAIN_TIMEOUT_S``, then stops the container as a user's stop
does. vLLM itself aborts the requests it still holds when it gets SIGTERM (measured on 0.32, see
the README), so the wait comes first.
"""

from __future__ import annotations

import time

from django.conf import settings

from core import naming
from core.periodic import Scope, system_job
from core.queues import enqueue, get_queue
from deployments.models import Deployment, DeploymentEvent, EventKind
from deployments.runtime import launcher
from deployments.runtime.engine_host import EngineHost, engine_address
from deployments.scaling import scaler, signals
from deployments.scaling.actions import DRAIN_JOB_TIMEOUT_S
from deployments.states import State

DRAIN_POLL_S = 0.5


@system_job(every=lambda: settings.BERTH_SCALER_INTERVAL_S, scope=Scope.CONSOLE)
def scaler_job() -> dict:
    """One look of the scaler at every autoscaled deployment."""
    return scaler.tick()


def enqueue_drain(row: Deployment) -> str:
    """Queue the drain-then-stop of ``row`` on its host's queue (on commit), under the id of
    its stop job, so reconcile sees the stop as queued."""
    return enqueue(
        get_queue(row.host.queue_name),
        drain_job,
        row.pk,
        row.generation,
        job_id=naming.deployment_job_id("stop", row.pk, row.generation),
        job_timeout=DRAIN_JOB_TIMEOUT_S,
    )


def drain_job(deployment_pk: int, generation: int) -> str:
    deployment = Deployment.objects.select_related("host").get(pk=deployment_pk)
    if deployment.generation != generation or deployment.state != State.STOPPING:
        return "nothing to do"
    waited, most = wait_drained(deployment, settings.BERTH_SCALE_DRAIN_TIMEOUT_S)
    DeploymentEvent.objects.create(
        deployment=deployment,
        generation=generation,
        kind=EventKind.PROGRESS,
        message=f"drained in {waited:.1f} s: {most:g} request(s) in the engine finished first"
        if most
        else f"drained in {waited:.1f} s: nothing was running",
        data={"drain_s": round(waited, 2), "in_flight": most},
    )
    with EngineHost.of(deployment.host) as engine:
        result = launcher.stop(engine, deployment, generation)
    return f"{result} after draining {waited:.1f} s"


def wait_drained(deployment: Deployment, timeout_s: float) -> tuple[float, float]:
    """Wait until the engine has nothing running or waiting (twice in a row) or ``timeout_s``;
    the seconds waited and the most requests seen in the engine meanwhile. An engine that does
    not answer has nothing left to finish."""
    started, most = time.monotonic(), 0.0
    if not deployment.host_port:
        return 0.0, most
    address = engine_address(deployment.host.docker_endpoint).strip("[]")
    idle_reads = 0
    while time.monotonic() - started < timeout_s:
        reading = signals.read_engine(address, deployment.host_port, deployment.engine_key)
        if reading is None:
            break
        in_engine = reading.running + reading.waiting
        most = max(most, in_engine)
        idle_reads = idle_reads + 1 if in_engine == 0 else 0
        if idle_reads >= 2:
            break
        time.sleep(DRAIN_POLL_S)
    return time.monotonic() - started, most
