"""Changing the number of a deployment's replicas: through the path a request takes (rules,
placement, quota, host memory, allocation at launch), and gracefully back down.

- :func:`add_replica` restarts a replica the scaler stopped earlier, where its host still has
  room (its compile cache volume is still there), else places a new one over the online hosts
  (fewest replicas of the deployment first, then most room). Both are validated as a new request
  is (the team's GPU and host memory quotas included), reserve host memory in the transaction
  that makes them active, and are launched on their host's queue, where the launch reserves the
  GPUs (database-enforced, foreign processes subtracted).
- :func:`drain` takes a replica out of the gateway's routes at once (``stopping`` is not routed)
  and queues the drain job: it waits until the engine has no request running or waiting, then
  stops the container (``deployments.scaling.jobs``).
- :func:`wake` brings an idle deployment back: a new generation of its first replica, on its
  host where that still has room (its compile cache and the model's page cache are there), else
  on another host.

Each raises :class:`Blocked` with the reason (quota, GPUs, host memory) when it cannot be done.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError
from django.utils import timezone

import audit
from audit.trail import denial_reason
from deployments import replicas as placement
from deployments.models import Deployment
from deployments.runtime import host_memory
from deployments.runtime.jobs import STOP_TIMEOUT_S, enqueue_launch
from deployments.runtime.placement import replica_slots
from deployments.services import restart_row
from deployments.states import ACTIVE, State
from deployments.validation import request_of, validated

LIVE = ACTIVE - {State.STOPPING}
DRAIN_JOB_TIMEOUT_S = STOP_TIMEOUT_S + 3600  # the drain's own deadline is a setting


class Blocked(Exception):
    """The replica cannot be added now; the message says why (quota, GPUs, host memory)."""


def live_rows(primary: Deployment) -> list[Deployment]:
    """The replicas that serve or are on their way to serving, by index."""
    return [row for row in primary.group().select_related("host") if row.state in LIVE]


def add_replica(primary: Deployment, why: str) -> Deployment:
    """One more replica (a stopped one restarted, or a new one placed); raises Blocked."""
    rows = list(primary.group().select_related("host", "team", "model", "image"))
    reasons = []
    for row in rows:
        if row.is_replica and row.state == State.STOPPED and row.delete_requested_at is None:
            try:
                return _restart(row, why)
            except Blocked as exc:
                reasons.append(f"replica {row.replica_index + 1} on {row.host.name}: {exc}")
    try:
        return _place_new(primary, rows, why)
    except Blocked as exc:
        reasons.append(str(exc))
    raise Blocked("; ".join(reasons))


def _restart(row: Deployment, why: str) -> Deployment:
    fresh = _validated(request_of(row))
    _check_room(fresh)
    _activate(lambda: _restart_row(row, fresh, why))
    return row


def _restart_row(row: Deployment, fresh: Deployment, why: str) -> None:
    # Another engine may have taken the port while it was stopped: the launch chooses again.
    Deployment.objects.filter(pk=row.pk).update(host_port=None)
    row.host_port = None
    restart_row(None, row, fresh)


def _place_new(primary: Deployment, rows: list[Deployment], why: str) -> Deployment:
    counts: dict[int, int] = {}
    for row in rows:
        if row.state in LIVE:
            counts[row.host_id] = counts.get(row.host_id, 0) + 1
    options, refused = [], []
    for host in placement.candidate_hosts():
        request = dataclasses.replace(request_of(primary), host=host, replaces=None)
        try:
            planned = _validated(request)
            room = _check_room(planned)
        except Blocked as exc:
            refused.append(f"{host.name}: {exc}")
            continue
        options.append((counts.get(host.pk, 0), -room, host.name, planned))
    if not options:
        where = "; ".join(refused) or "no host is online"
        raise Blocked(f"no host can take another replica ({where})")
    planned = min(options, key=lambda option: option[:3])[3]
    planned.replica_of = primary
    planned.replica_index = max(row.replica_index for row in rows) + 1
    planned.replicas = 1
    planned.engine_key = ""

    def create() -> None:
        host_memory.check_and_hold(planned)
        planned.save()
        planned.transition(
            State.QUEUED,
            message=f"replica {planned.replica_index + 1} added by the scaler ({why}); "
            f"queued on {planned.host.queue_name}",
        )
        enqueue_launch(planned)

    _activate(create)
    return planned


def _validated(request: Any) -> Deployment:
    try:
        return validated(None, request)
    except (ValidationError, PermissionDenied) as exc:
        raise Blocked(denial_reason(exc)) from None


def _check_room(row: Deployment) -> int:
    """How many more replicas like ``row`` its host can take now (at least 1, or Blocked)."""
    if row.gpu_count:
        slots, why_not = replica_slots(row, limit=4)
        if not slots:
            raise Blocked(f"no free GPUs on {row.host.name}: {why_not}")
        return len(slots)
    if not row.host_memory_bytes:
        return 4  # the stand-in holds nothing
    free = host_memory.free_bytes(row.host, exclude_pk=row.pk)
    if free is None or free < row.host_memory_bytes:
        have = "unknown" if free is None else f"{free / host_memory.GIB:.1f} GiB"
        raise Blocked(
            f"{row.host.name} has {have} of host memory free for CPU engines, "
            f"{row.host_memory_bytes / host_memory.GIB:.1f} GiB needed"
        )
    return free // row.host_memory_bytes


def _activate(step: Any) -> None:
    """Run ``step`` in one audited transaction; quota and host memory refusals are Blocked."""
    try:
        with audit.chain_transaction():
            step()
    except host_memory.HostMemoryFull as exc:
        raise Blocked(denial_reason(exc)) from None
    except ValidationError as exc:
        raise Blocked(denial_reason(exc)) from None
    except IntegrityError as exc:
        raise Blocked(f"another change got there first ({exc}); trying again") from None


def drain(row: Deployment, why: str) -> bool:
    """Stop routing to ``row`` and queue its drain-then-stop job; False when it moved
    meanwhile."""
    from deployments.scaling.jobs import enqueue_drain

    with audit.chain_transaction():
        if not row.transition(State.STOPPING, message=f"draining: {why}"):
            return False
        enqueue_drain(row)
    return True


def wake(primary: Deployment, *, desired: int, why: str) -> None:
    """A new generation of the idle deployment's first replica (its own host first, else
    another with room); ``replicas`` becomes ``desired``. Raises Blocked."""
    primary = Deployment.objects.select_related("host", "team", "model", "image").get(pk=primary.pk)
    if primary.state != State.IDLE:
        return
    reasons = []
    hosts = [primary.host] + [h for h in placement.candidate_hosts() if h.pk != primary.host_id]
    for host in hosts:
        try:
            fresh = _validated(dataclasses.replace(request_of(primary), host=host))
            _check_room(fresh)
            _activate(lambda fresh=fresh, host=host: _wake_on(primary, fresh, host, desired, why))
            return
        except Blocked as exc:
            reasons.append(f"{host.name}: {exc}")
    raise Blocked("cannot wake: " + "; ".join(reasons))


def _wake_on(primary: Deployment, fresh: Deployment, host: Any, desired: int, why: str) -> None:
    now = timezone.now()
    moved = host.pk != primary.host_id
    Deployment.objects.filter(pk=primary.pk).update(
        host=host, host_port=None, woken_at=now, replicas=desired, scaler_state={}
    )
    primary.host, primary.host_port, primary.woken_at, primary.replicas = host, None, now, desired
    primary.scaler_state = {}
    if moved:
        fresh.host = host
    restart_row(None, primary, fresh)
    primary.events.create(
        generation=primary.generation,
        kind="info",
        message=f"woken: {why}" + (f" (on {host.name}: its own host had no room)" if moved else ""),
        data={"desired": desired},
    )


def wake_on_request(deployment_id: int, detail: str) -> str:
    """The gateway's wake (in a thread): '' when the deployment is waking (or was already),
    else why it cannot. Recorded like the scaler's decisions."""
    from deployments.scaling import scaler

    primary = Deployment.objects.filter(pk=deployment_id).first()
    if primary is None:
        return "the deployment was deleted"
    primary = Deployment.objects.get(pk=primary.primary_id)
    return scaler.wake_for_request(primary, detail)
