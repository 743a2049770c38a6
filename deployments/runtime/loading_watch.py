"""While an engine loads, one watch job run stays with it and sees it ready within a tenth of a
second, instead of one look a second re-booked through the scheduler.

Measured on the real CPU engine (``benchmarks/real_engine.py``): a watcher that looks once per
``BERTH_MONITOR_INTERVAL_S`` and is booked again through RQ's scheduler (which itself moves due
jobs once a second) saw ``/health`` answer 0.5-2 s after the engine listened. Here a run polls
``/health`` every :data:`POLL_S` and makes the full look (logs, milestones, container state,
stall timer: ``launcher.watch``) every ``BERTH_MONITOR_INTERVAL_S`` as before. It gives the
host's worker back as soon as another job waits on the queue (a launch, a stop, another
deployment's watcher) and after :data:`HOLD_S` at most, booking its next run as before::

    again = watch_while_loading(engine, deployment, generation, others_waiting=lambda: False)
"""

from __future__ import annotations

import time
from collections.abc import Callable

from django.conf import settings

from deployments.models import Deployment
from deployments.runtime import launcher
from deployments.runtime.engine_host import EngineHost
from deployments.states import State

POLL_S = 0.1  # /health while loading: a refused connect costs well under a millisecond
# One job run holds the host's worker at most this long; well under the watch job's timeout
# (120 s), and the gap to the next run (about a second) falls in one hold of thirty.
HOLD_S = 30.0


def watch_while_loading(
    engine: EngineHost,
    deployment: Deployment,
    generation: int,
    *,
    others_waiting: Callable[[], bool],
    hold_s: float = HOLD_S,
    poll_s: float = POLL_S,
) -> bool:
    """One look (``launcher.watch``), then, while the deployment is loading: ``/health`` every
    ``poll_s`` and a full look every monitor interval or as soon as it answers, until the
    deployment leaves ``loading``, ``others_waiting()`` or ``hold_s`` passed. Returns whether to
    look again (as ``launcher.watch``)."""
    end = time.monotonic() + hold_s
    again = launcher.watch(engine, deployment, generation)
    next_look = time.monotonic() + settings.BERTH_MONITOR_INTERVAL_S
    while again and deployment.state == State.LOADING and time.monotonic() < end:
        if others_waiting():
            break
        answered = launcher.probe(settings.BERTH_ENGINE_BIND, deployment.host_port)
        if answered.state == "healthy" or time.monotonic() >= next_look:
            deployment.refresh_from_db()  # a stop or restart may have moved it meanwhile
            again = launcher.watch(engine, deployment, generation)
            next_look = time.monotonic() + settings.BERTH_MONITOR_INTERVAL_S
        else:
            time.sleep(poll_s)
    return again
