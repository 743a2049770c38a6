"""The scaler's look at each autoscaled deployment (the periodic job calls :func:`tick`):

1. read the figures (``signals``: each ready replica's ``/metrics``, the gateways' demand);
2. decide (``decide``, pure) and keep its memory on the deployment;
3. record a change of the desired count: an event on the timeline and an audit record, both
   with the figures that drove it;
4. converge: add replicas (``actions.add_replica`` / ``actions.wake``) or drain them
   (``actions.drain``) until the live ones match the desired count; a scale-up that the quota,
   the GPUs or the host memory stop is stored (``scaling_blocked``: the page and the gateway's
   answers show it) and audited once per reason.

A sample of every look is kept for the page's chart (:data:`SAMPLES_KEPT`).
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from django.utils import timezone

import audit
from audit.actions import Action, Outcome
from deployments.changes import publish
from deployments.models import Deployment, DeploymentEvent, EventKind, ScalingSample
from deployments.scaling import actions, signals
from deployments.scaling.decide import (
    Action as Decided,
)
from deployments.scaling.decide import (
    Decision,
    Load,
    Memory,
    Policy,
    ReplicaLoad,
    decide,
)
from deployments.states import State

logger = logging.getLogger(__name__)
SAMPLES_KEPT = timedelta(hours=24)
# After a replica failed, no other is added for this long: a crash on start would otherwise
# make the scaler add one replica after another, each failing the same way.
FAILED_BACKOFF = timedelta(minutes=5)
# States of the first replica in which the scaler looks after a deployment (a stopped, failed
# or user-stopped one is the user's).
LOOKED_AFTER = frozenset(
    {State.QUEUED, State.LAUNCHING, State.LOADING, State.READY, State.UNHEALTHY, State.IDLE}
)


def policy_of(primary: Deployment) -> Policy:
    return Policy(
        min_replicas=primary.min_replicas,
        max_replicas=primary.max_replicas,
        target_waiting=primary.target_waiting,
        target_kv_cache=primary.target_kv_cache,
        up_window_s=primary.scale_up_window_s,
        down_window_s=primary.scale_down_window_s,
        idle_after_s=primary.idle_after_s,
    )


def tick() -> dict[str, Any]:
    """One look at every autoscaled deployment; what was decided, by deployment."""
    done: dict[str, Any] = {}
    primaries = Deployment.objects.primaries().filter(
        autoscale=True, state__in=sorted(LOOKED_AFTER), delete_requested_at__isnull=True
    )
    for primary in primaries.select_related("team", "host"):
        try:
            decision = look(primary)
        except Exception:  # one deployment's trouble must not stop the others' scaling
            logger.exception("scaler: looking at %s failed", primary)
            continue
        done[str(primary)] = {"desired": decision.desired, "action": decision.action}
    ScalingSample.objects.filter(time__lt=timezone.now() - SAMPLES_KEPT).delete()
    return done


def load_of(primary: Deployment, rows: list[Deployment]) -> Load:
    ready = [row for row in rows if row.state == State.READY]
    readings = signals.read_replicas(ready)
    loads = []
    for row in rows:
        reading = readings.get(row.pk)
        loads.append(
            ReplicaLoad(
                index=row.replica_index,
                state=str(row.state),
                waiting=reading.waiting if reading else None,
                running=reading.running if reading else None,
                kv_cache=reading.kv_cache if reading else None,
            )
        )
    demand = signals.read_demand(primary.team_id, primary.name)
    return Load(tuple(loads), demand.queued, demand.last_request_at)


def look(primary: Deployment, *, now: float | None = None) -> Decision:
    """Decide for one deployment, record a change, and converge its replicas."""
    rows = actions.live_rows(primary)
    load = load_of(primary, rows)
    memory = Memory.from_json(primary.scaler_state)
    decision = decide(policy_of(primary), primary.replicas, load, now or time.time(), memory)
    changed = decision.desired != primary.replicas
    values: dict[str, Any] = {"scaler_state": decision.memory.to_json()}
    if changed:
        values["replicas"] = decision.desired
    updated = Deployment.objects.filter(pk=primary.pk, replicas=primary.replicas).update(**values)
    if not updated:
        return decision  # someone changed the desired count meanwhile: the next look decides
    old = primary.replicas
    primary.scaler_state = values["scaler_state"]
    primary.replicas = decision.desired
    _sample(primary, decision)
    if changed:
        _record(primary, old, decision)
    converge(primary, decision)
    return decision


def _sample(primary: Deployment, decision: Decision) -> None:
    figures = decision.figures
    ScalingSample.objects.create(
        deployment=primary,
        desired=decision.desired,
        ready=figures["ready"],
        starting=figures["starting"],
        waiting=figures["waiting"],
        running=figures["running"],
        queued=figures["queued"],
        kv_cache=figures["kv_cache"],
    )


def _record(primary: Deployment, old: int, decision: Decision) -> None:
    message = f"scaler: {old} → {decision.desired} replicas ({decision.action}: {decision.why})"
    with audit.chain_transaction():
        DeploymentEvent.objects.create(
            deployment=primary,
            generation=primary.generation,
            kind=EventKind.INFO,
            message=message,
            data={"scaling": decision.action, "old": old, "new": decision.desired,
                  "figures": decision.figures},
        )  # fmt: skip
        audit.record(
            Action.DEPLOYMENT_SCALED,
            target=primary,
            old=old,
            new=decision.desired,
            decision=decision.action,
            why=decision.why,
            figures=decision.figures,
        )
    publish(primary.pk, "scaling")


def converge(primary: Deployment, decision: Decision | None = None) -> None:
    """Add or drain replicas until the live ones match ``primary.replicas``."""
    desired = primary.replicas
    rows = actions.live_rows(primary)
    why = decision.why if decision else "policy"
    if desired == 0:
        for row in sorted(rows, key=lambda row: -row.replica_index):
            actions.drain(row, f"scaled to zero ({why})")
        return
    if len(rows) > desired:
        extra = [row for row in rows if row.is_replica]
        for row in sorted(extra, key=lambda row: -row.replica_index)[: len(rows) - desired]:
            actions.drain(row, f"scaled down to {desired} ({why})")
        return
    missing = desired - len(rows)
    if not missing:
        _unblock(primary)
        return
    failed = _failed_lately(primary)
    if failed is not None:  # adding another now would likely fail the same way, again and again
        # Stable wording (no "seconds ago"): a block is audited once per reason.
        reason = (
            f"replica {failed.replica_index + 1} failed at {failed.updated:%H:%M:%S} UTC "
            f"({failed.last_error[:200]}); the scaler adds no replica for "
            f"{FAILED_BACKOFF.seconds // 60} minutes after a failure (or restart it)"
        )
        block(primary, reason, decision)
        return
    try:
        if primary.state == State.IDLE:
            actions.wake(primary, desired=desired, why=why)
            missing -= 1
        for _ in range(missing):
            actions.add_replica(primary, why)
    except actions.Blocked as exc:
        block(primary, str(exc), decision)
        return
    _unblock(primary)


def _failed_lately(primary: Deployment) -> Deployment | None:
    """A replica of the deployment that failed within :data:`FAILED_BACKOFF`."""
    since = timezone.now() - FAILED_BACKOFF
    return (
        primary.group().filter(state=State.FAILED, updated__gte=since).order_by("-updated").first()
    )


def block(primary: Deployment, reason: str, decision: Decision | None) -> None:
    """Store why a scale-up or wake cannot be made; timeline and audit once per reason."""
    reason = reason[:500]
    if primary.scaling_blocked == reason:
        return
    primary.store(scaling_blocked=reason)
    figures = decision.figures if decision else {}
    with audit.chain_transaction():
        DeploymentEvent.objects.create(
            deployment=primary,
            generation=primary.generation,
            kind=EventKind.INFO,
            message=f"scale-up blocked: {reason}",
            data={"scaling": "blocked", "desired": primary.replicas, "figures": figures},
        )
        audit.record(
            Action.DEPLOYMENT_SCALE_BLOCKED,
            target=primary,
            outcome=Outcome.DENIED,
            desired=primary.replicas,
            reason=reason,
            figures=figures,
        )
    publish(primary.pk, "scaling")


def _unblock(primary: Deployment) -> None:
    if primary.scaling_blocked:
        primary.store(scaling_blocked="")
        publish(primary.pk, "scaling")


def wake_for_request(primary: Deployment, detail: str) -> str:
    """Wake an idle deployment for a request waiting at a gateway: '' when it is waking (or
    no longer idle), else why it cannot (stored, shown and audited like a blocked scale-up)."""
    if primary.state != State.IDLE:
        return ""
    desired = max(primary.min_replicas, 1)
    old = primary.replicas
    decision = Decision(desired, Decided.WAKE, detail, {"queued": 1, "desired": desired})
    try:
        actions.wake(primary, desired=desired, why=detail)
    except actions.Blocked as exc:
        block(primary, str(exc), decision)
        return str(exc)
    primary.refresh_from_db()
    _record(primary, old, decision)
    _unblock(primary)
    return ""
