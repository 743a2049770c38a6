"""Deployments as people see them: one entry per deployment, its replicas summarised.

A deployment is one row per replica (``Deployment.group()``). Lists, the dashboard, the metrics
and the JSON API show each deployment's first row with a :class:`Replicas` summary, read for a
whole page of deployments in one query::

    summaries = summarise(page)          # {first replica's pk: Replicas}
    summaries[deployment.pk].text        # "2/3 ready"
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.db.models import Q

import audit
from audit.actions import Action, Outcome
from deployments.models import Deployment
from deployments.states import State

# The state a deployment shows is its replica's closest to serving: a name with one ready
# replica answers requests, and a deployment still starting a replica is not "failed".
STATE_ORDER: tuple[State, ...] = (
    State.READY,
    State.UNHEALTHY,
    State.LOADING,
    State.LAUNCHING,
    State.QUEUED,
    State.PENDING,
    State.IDLE,  # scaled to zero: the name still answers (the first request wakes it)
    State.STOPPING,
    State.FAILED,
    State.STOPPED,
)


def deployment_state(states: Iterable[str]) -> State:
    """The state a deployment shows for its replicas' states (see :data:`STATE_ORDER`)."""
    present = {State(state) for state in states}
    return next(state for state in STATE_ORDER if state in present)


@dataclass(frozen=True)
class Replicas:
    """A deployment's replicas at a glance: their states and hosts, by replica index."""

    states: tuple[str, ...]
    hosts: tuple[str, ...]
    desired: int
    deleting: bool = False

    @property
    def total(self) -> int:
        return len(self.states)

    @property
    def ready(self) -> int:
        return self.states.count(State.READY)

    @property
    def state(self) -> State:
        return deployment_state(self.states)

    @property
    def state_label(self) -> str:
        return self.state.label

    @property
    def text(self) -> str:
        """``"2/3 ready"``, then the other replicas' states (``"· 1 failed"``)."""
        others = Counter(state for state in self.states if state != State.READY)
        rest = "".join(f" · {n} {State(state).label.lower()}" for state, n in others.items())
        return f"{self.ready}/{self.total} ready{rest}"

    @property
    def host_counts(self) -> list[tuple[str, int]]:
        """Each host once, in replica order, with how many replicas it runs."""
        return list(Counter(self.hosts).items())

    @property
    def hosts_text(self) -> str:
        return ", ".join(
            name if count == 1 else f"{name} ({count})" for name, count in self.host_counts
        )


def summarise(deployments: Sequence[Deployment]) -> dict[int, Replicas]:
    """Each deployment's :class:`Replicas`, by its first replica's pk, in one query."""
    pks = [deployment.primary_id for deployment in deployments]
    rows = (
        Deployment.objects.filter(Q(pk__in=pks) | Q(replica_of__in=pks))
        .order_by("replica_index")
        .values_list("pk", "replica_of_id", "state", "host__name", "delete_requested_at")
    )
    grouped: dict[int, list[tuple[str, str, bool]]] = {pk: [] for pk in pks}
    for pk, replica_of, state, host, delete_requested_at in rows:
        grouped[replica_of or pk].append((state, host, delete_requested_at is not None))
    desired = {deployment.primary_id: deployment.replicas for deployment in deployments}
    return {pk: _replicas(members, desired[pk]) for pk, members in grouped.items() if members}


def of_rows(rows: Sequence[Deployment]) -> Replicas:
    """The summary of one deployment's rows (``Deployment.group()``, hosts selected)."""
    return _replicas(
        [(row.state, row.host.name, row.delete_requested_at is not None) for row in rows],
        rows[0].replicas,
    )


def _replicas(members: list[tuple[str, str, bool]], desired: int) -> Replicas:
    return Replicas(
        states=tuple(state for state, _, _ in members),
        hosts=tuple(host for _, host, _ in members),
        desired=desired,
        deleting=any(deleting for _, _, deleting in members),
    )


def count_by_state(rows: Iterable[tuple[int, int | None, str]]) -> Counter[str]:
    """Deployments per shown state from ``(pk, replica_of_id, state)`` of every row."""
    groups: dict[int, list[str]] = {}
    for pk, replica_of, state in rows:
        groups.setdefault(replica_of or pk, []).append(state)
    return Counter(deployment_state(states).value for states in groups.values())


def refuse_replica_action(user: object, replica: Deployment, action: Action) -> ValidationError:
    """Stop, restart and delete act on a whole deployment: asked of a further replica's own
    id, the refusal (audited ``denied``) names the deployment to act on instead."""
    primary = replica.replica_of
    reason = (
        f"this is replica {replica.replica_index + 1} of {primary.team.slug}/{primary.name}: "
        f"stop, restart and delete act on the whole deployment (id {primary.public_id})"
    )
    audit.record(
        action, outcome=Outcome.DENIED, target=replica, actor=user, state=str(replica.state),
        reason=reason,
    )  # fmt: skip
    return ValidationError({"state": reason})
