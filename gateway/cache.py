"""What a gateway holds in memory: the keys and the routing table, read from the database.

The hot path never queries the database. :func:`load` builds an immutable :class:`Snapshot`
(one query for keys and teams, one for deployments, one for their loading start times); the
gateway swaps it in whole when Redis says keys or deployments changed, and on a timer. When the
database cannot be read the previous snapshot stays in service.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.db.models import Max, Q
from django.utils import timezone

from accounts.models import ApiKey
from deployments.models import Deployment, DeploymentEvent, EventKind
from deployments.runtime.engine_host import engine_address
from deployments.states import ACTIVE, State

# States a request waits through (up to BERTH_GATEWAY_HOLD_S) rather than failing at once:
# vLLM refuses requests while it loads, an unhealthy engine often comes back, and an idle
# deployment (scaled to zero) is woken by the request itself.
WAITING = frozenset({State.QUEUED, State.LAUNCHING, State.LOADING, State.UNHEALTHY, State.IDLE})
EXPIRED_KEPT = timedelta(days=30)


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """A usable key as the gateway checks it (the hash, never the key)."""

    prefix: str
    secret_hash: str
    team_id: int
    team_slug: str
    scope: str
    model_names: frozenset[str]
    expires_at: float | None  # Unix time
    rpm: int | None
    tpm: int | None
    team_budget: int | None  # tokens per calendar month for the whole team

    def may_use(self, model: str) -> bool:
        return not self.model_names or model in self.model_names


@dataclass(frozen=True, slots=True)
class Backend:
    """One engine serving a model: a deployment's replica."""

    deployment_id: int
    replica: int
    name: str
    state: str
    url: str  # http://address:port, empty before a port is known
    engine_key: str = ""
    error: str = ""  # why it failed, when it did
    diagnosis: tuple[tuple[str, str, str], ...] = ()  # (code, title, remedy), root cause first
    ready_eta_s: float | None = None  # Unix time the engine is expected to be ready

    @property
    def ident(self) -> tuple[int, int]:
        return (self.deployment_id, self.replica)


@dataclass(frozen=True, slots=True)
class Route:
    """Every backend of one served model name of one team."""

    backends: tuple[Backend, ...]
    # Why the deployment's scaler cannot add a replica or wake it now ("" when it can).
    blocked: str = ""

    @property
    def idle(self) -> tuple[Backend, ...]:
        return tuple(b for b in self.backends if b.state == State.IDLE)

    @property
    def ready(self) -> tuple[Backend, ...]:
        return tuple(b for b in self.backends if b.state == State.READY and b.url)

    @property
    def waiting(self) -> tuple[Backend, ...]:
        return tuple(b for b in self.backends if b.state in WAITING)


@dataclass(frozen=True)
class Snapshot:
    keys: dict[str, KeyEntry] = field(default_factory=dict)  # by prefix
    routes: dict[tuple[int, str], Route] = field(default_factory=dict)  # (team id, model name)
    loaded_at: float = 0.0

    def models_of(self, key: KeyEntry) -> list[str]:
        """Served model names ``key`` may reach that have a live (not failed) backend."""
        return sorted(
            name
            for (team_id, name), route in self.routes.items()
            if team_id == key.team_id
            and key.may_use(name)
            and any(b.state != State.FAILED for b in route.backends)
        )


def load() -> Snapshot:
    """Read keys and routes from the database (raises the database's error when it is down)."""
    return Snapshot(keys=_keys(), routes=_routes(), loaded_at=time.time())


def _keys() -> dict[str, KeyEntry]:
    # Keys that expired lately stay in the cache so a refusal can say "expired" (the hot path
    # checks the time itself), not just "invalid".
    recently = timezone.now() - EXPIRED_KEPT
    rows = (
        ApiKey.objects.filter(revoked_at__isnull=True)
        .filter(Q(expires__isnull=True) | Q(expires__gt=recently))
        .select_related("team")
        .order_by()
    )
    return {
        key.prefix: KeyEntry(
            prefix=key.prefix,
            secret_hash=key.secret_hash,
            team_id=key.team_id,
            team_slug=key.team.slug,
            scope=key.scope,
            model_names=frozenset(key.model_names or ()),
            expires_at=key.expires.timestamp() if key.expires else None,
            rpm=key.rpm,
            tpm=key.tpm,
            team_budget=key.team.monthly_token_budget,
        )
        for key in rows
    }


def _routes() -> dict[tuple[int, str], Route]:
    deployments = list(
        Deployment.objects.filter(state__in=[*ACTIVE, State.FAILED, State.IDLE])
        .exclude(state=State.STOPPING)
        .select_related("host")
        .order_by("created")
    )
    started = _loading_started([d.pk for d in deployments if d.state in WAITING])
    by_name: dict[tuple[int, str], list[Deployment]] = defaultdict(list)
    for deployment in deployments:
        by_name[(deployment.team_id, deployment.name)].append(deployment)
    routes = {}
    for name, group in by_name.items():
        live = [d for d in group if d.state != State.FAILED]
        # With no live deployment, the newest failed one explains the 503 (its diagnosis).
        chosen = live or group[-1:]
        blocked = next((d.scaling_blocked for d in group if d.replica_of_id is None), "")
        routes[name] = Route(tuple(_backend(d, started.get(d.pk)) for d in chosen), blocked)
    return routes


def _loading_started(deployment_ids: list[int]) -> dict[int, Any]:
    if not deployment_ids:
        return {}
    return dict(
        DeploymentEvent.objects.filter(
            deployment_id__in=deployment_ids, kind=EventKind.STATE, state=State.QUEUED
        )
        .values_list("deployment_id")
        .annotate(at=Max("time"))
        .values_list("deployment_id", "at")
    )


def _backend(deployment: Deployment, loading_since: Any) -> Backend:
    url = ""
    if deployment.host_port:
        url = f"http://{engine_address(deployment.host.docker_endpoint)}:{deployment.host_port}"
    eta = None
    plan = deployment.stored_plan
    if deployment.state in WAITING and deployment.state != State.IDLE and plan is not None:
        since = loading_since or deployment.updated or timezone.now()
        eta = since.timestamp() + float(plan.startup_estimate_s)
    findings = tuple(
        (str(item.get("code", "")), str(item.get("title", "")), str(item.get("remedy", "")))
        for item in deployment.diagnosis or []
        if isinstance(item, dict)
    )
    return Backend(
        deployment_id=deployment.pk,
        replica=deployment.replica_index,
        name=deployment.name,
        state=deployment.state,
        url=url,
        engine_key=deployment.engine_key,
        error=deployment.last_error[:500] if deployment.state == State.FAILED else "",
        diagnosis=findings,
        ready_eta_s=eta,
    )
