"""How far a deployment's start-up has come, for its page: how long since it was queued, of how
long the plan expected, the latest step and how long the log has been quiet::

    progress = load_progress(deployment, events)    # None once it is ready, failed or stopped
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.utils import timezone

from deployments.models import Deployment, EventKind
from deployments.states import State

LOADING_STATES = (State.QUEUED, State.LAUNCHING, State.LOADING)


@dataclass(frozen=True)
class LoadProgress:
    """What the page says while a deployment starts: how long, of how long expected."""

    state: str
    elapsed_s: int
    expected_s: int | None
    percent: int | None
    last_step: str
    quiet_s: int | None
    stall_timeout_s: int


def load_progress(
    deployment: Deployment, events: Iterable[Any] = (), now: datetime | None = None
) -> LoadProgress | None:
    """The load's progress while the deployment is queued, launching or loading, else None.
    The expected time is the plan's start-up estimate; without a plan (a CPU engine) there is
    no percentage to show."""
    if deployment.state not in LOADING_STATES:
        return None
    rows = list(events)
    now = now or timezone.now()
    started = rows[0].time if rows else deployment.created
    elapsed = max(int((now - started).total_seconds()), 0)
    plan = deployment.stored_plan
    expected = plan.startup_estimate_s if plan else None
    progress = [event for event in rows if event.kind == EventKind.PROGRESS]
    last = progress[-1] if progress else (rows[-1] if rows else None)
    quiet = None
    if deployment.last_progress_at is not None:
        quiet = max(int((now - deployment.last_progress_at).total_seconds()), 0)
    return LoadProgress(
        state=deployment.state,
        elapsed_s=elapsed,
        expected_s=expected,
        percent=min(int(elapsed * 100 / expected), 99) if expected else None,
        last_step=last.message if last is not None else "waiting for the host's worker",
        quiet_s=quiet,
        stall_timeout_s=deployment.stall_timeout_s,
    )
