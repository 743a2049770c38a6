"""Who is acting, under which request or job: carried in a ContextVar into ``record()``.

The request middleware binds the request id, the client address and the request itself (the
user is resolved lazily, after authentication has run); a job binds the snapshot taken when it
was enqueued, so events written inside the job join the request that caused them::

    with context.bind(request_id="abc", actor_kind=ActorKind.SYSTEM):
        audit.record(Action.GC_RAN, bytes_reclaimed=123)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from django.http import HttpRequest

ACTOR_USER = "user"
ACTOR_SYSTEM = "system"
ACTOR_JOB = "job"


@dataclass(frozen=True, slots=True)
class AuditContext:
    """The ambient facts an audit event copies. All optional: a cron job has no request."""

    request_id: str | None = None
    client_ip: str | None = None
    job_id: str | None = None
    actor_id: int | None = None
    actor_name: str | None = None
    actor_kind: str = ACTOR_SYSTEM
    request: HttpRequest | None = None


@dataclass(frozen=True, slots=True)
class Actor:
    """The resolved actor of an event."""

    user_id: int | None
    name: str
    kind: str


_current: ContextVar[AuditContext] = ContextVar("berth_audit_context", default=AuditContext())  # noqa: B039


def current() -> AuditContext:
    """The context of the running request or job (an empty one outside both)."""
    return _current.get()


@contextmanager
def bind(**changes: Any) -> Iterator[AuditContext]:
    """Replace fields of the current context for the duration of the block."""
    token = _current.set(replace(_current.get(), **changes))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def resolve_actor() -> Actor:
    """The actor of the current context: the signed-in user of the request, the user a job was
    enqueued for, or the system."""
    ctx = _current.get()
    user = getattr(ctx.request, "user", None) if ctx.request is not None else None
    if user is not None and user.is_authenticated:
        # An API key acting on the JSON API carries its own kind (accounts.keys.KeyUser).
        return Actor(user.pk, user.get_username(), getattr(user, "actor_kind", ACTOR_USER))
    if ctx.request is not None:
        return Actor(None, "anonymous", ACTOR_USER)
    if ctx.actor_id is not None or ctx.actor_name:
        return Actor(ctx.actor_id, ctx.actor_name or "", ctx.actor_kind)
    return Actor(None, ACTOR_SYSTEM, ctx.actor_kind)


def snapshot() -> dict[str, Any]:
    """A JSON-native copy of the current context, stored in an RQ job's meta."""
    ctx = _current.get()
    actor = resolve_actor()
    return {
        "request_id": ctx.request_id,
        "client_ip": ctx.client_ip,
        "actor_id": actor.user_id,
        "actor_name": actor.name if actor.kind != ACTOR_SYSTEM or actor.user_id else None,
    }


@contextmanager
def bind_job(job_id: str, saved: dict[str, Any]) -> Iterator[AuditContext]:
    """Run a job under the context it was enqueued with; its actor kind is ``job``."""
    with bind(
        request=None,
        request_id=saved.get("request_id"),
        client_ip=saved.get("client_ip"),
        actor_id=saved.get("actor_id"),
        actor_name=saved.get("actor_name"),
        actor_kind=ACTOR_JOB,
        job_id=job_id,
    ) as ctx:
        yield ctx
