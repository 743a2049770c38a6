"""A deployment's states and the transitions between them, validated in one place.

    pending → queued → launching → loading → ready
                 ↘         ↘          ↘        ↘ unhealthy ⇄ ready
                  failed ← (any running state) ; stopping → stopped
                                                  stopping → idle → queued (woken)
                                                                  ↘ stopped

``failed`` and ``stopped`` are terminal for a generation; a restart starts a new generation
at ``queued``. ``idle`` is a deployment its scaler took to zero replicas (``deployments.scaling``):
its first replica's container is stopped and its GPUs or host memory released, but the gateway
still routes its name, and the first request wakes it (a new generation at ``queued``). A user's
stop takes an idle deployment straight to ``stopped``.
"""

from __future__ import annotations

from django.db import models


class State(models.TextChoices):
    PENDING = "pending", "Pending"
    QUEUED = "queued", "Queued"
    LAUNCHING = "launching", "Launching"
    LOADING = "loading", "Loading"
    READY = "ready", "Ready"
    UNHEALTHY = "unhealthy", "Unhealthy"
    FAILED = "failed", "Failed"
    STOPPING = "stopping", "Stopping"
    STOPPED = "stopped", "Stopped"
    IDLE = "idle", "Idle"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.QUEUED, State.FAILED, State.STOPPED}),
    State.QUEUED: frozenset({State.LAUNCHING, State.FAILED, State.STOPPING}),
    State.LAUNCHING: frozenset({State.LOADING, State.FAILED, State.STOPPING}),
    State.LOADING: frozenset({State.READY, State.FAILED, State.STOPPING}),
    State.READY: frozenset({State.UNHEALTHY, State.FAILED, State.STOPPING}),
    State.UNHEALTHY: frozenset({State.READY, State.FAILED, State.STOPPING}),
    State.STOPPING: frozenset({State.STOPPED, State.FAILED, State.IDLE}),
    State.IDLE: frozenset({State.QUEUED, State.STOPPED}),  # woken, or stopped by a user
    State.FAILED: frozenset({State.QUEUED}),  # restart: a new generation
    State.STOPPED: frozenset({State.QUEUED}),  # restart: a new generation
}

ACTIVE = frozenset(
    {State.QUEUED, State.LAUNCHING, State.LOADING, State.READY, State.UNHEALTHY, State.STOPPING}
)
"""States in which a deployment holds GPUs."""

NAMED = ACTIVE | {State.IDLE}
"""States in which a deployment owns its name (the gateway routes it; no other may take it)."""

TERMINAL = frozenset({State.FAILED, State.STOPPED})


class TransitionError(ValueError):
    """A state change the lifecycle does not allow."""


def check_transition(old: State | str, new: State | str) -> None:
    """Raise :class:`TransitionError` unless ``old → new`` is allowed."""
    old, new = State(old), State(new)
    if new not in TRANSITIONS[old]:
        allowed = ", ".join(sorted(TRANSITIONS[old])) or "nothing"
        raise TransitionError(f"a deployment cannot go from {old} to {new} (from {old}: {allowed})")
