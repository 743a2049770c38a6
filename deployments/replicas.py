"""Placing a deployment's replicas over hosts when it is requested.

Each replica is planned again for the GPUs of the host it lands on (``validated`` with that
host): a host whose GPUs cannot fit the model, or that has no free GPUs or host memory left for
one more, gets no replica. Replicas spread over hosts (the host with the fewest replicas so far
takes the next one, the one with most room left first), each on GPUs of its own, and the team's
quota must hold all of them::

    rows = place(user, DeployRequest(..., host=None, replicas=3))   # unsaved, replica 0 first

The launch chooses the GPUs again on its host (readings move, and the database refuses a GPU
held twice); this is the request's check, so a request that cannot be met is refused before
anything is queued.
"""

from __future__ import annotations

import copy
import dataclasses
import uuid
from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.utils import timezone

from audit.trail import denial_reason
from deployments.models import MAX_REPLICAS, Deployment
from deployments.runtime import host_memory
from deployments.runtime.placement import replica_slots
from deployments.validation import DeployRequest, check_team_quota, validated
from gpus.models import Host


@dataclass
class _Option:
    host: Host
    row: Deployment  # unsaved, planned for this host
    room: int  # replicas this host can take now (up to the count asked for)
    given: int = 0


def candidate_hosts() -> list[Host]:
    """Hosts placement may choose: online, with a fresh heartbeat (by name, for a stable order)."""
    now = timezone.now()
    return [host for host in Host.objects.order_by("name") if host.placeable(now)]


def place(user: object, data: DeployRequest) -> list[Deployment]:
    """The replicas' rows, unsaved, replica 0 first; raises ValidationError naming the field
    (``host``, ``replicas`` or the request's own fields) and the fix."""
    count = data.replicas
    if not 1 <= count <= MAX_REPLICAS:
        raise ValidationError({"replicas": f"choose between 1 and {MAX_REPLICAS} replicas"})
    if data.host is not None and count == 1:
        # One engine on the host asked for: its launch chooses the GPUs (and says why not), as
        # a deployment always did; an idle host's readings are not required to queue it.
        return [validated(user, data)]
    if data.host is not None:
        hosts = [data.host]
    else:
        hosts = candidate_hosts()
        if not hosts:
            raise ValidationError(
                {"host": "no host is online to place the deployment on: start a host's agent "
                 "(manage.py berth_agent) or choose a host"}
            )  # fmt: skip
    options, refused = [], {}
    for host in hosts:
        try:
            row = validated(user, dataclasses.replace(data, host=host))
        except ValidationError as exc:
            if len(hosts) == 1:
                raise
            refused[host.name] = (exc, denial_reason(exc))
            continue
        room, why_not = _room(row, count)
        if room == 0:
            refused[host.name] = (None, why_not)
            continue
        options.append(_Option(host, row, room))
    if not options:
        raise _nowhere(refused, count)
    chosen = _spread(options, count)
    if len(chosen) < count:
        where = ", ".join(f"{o.host.name}: {o.given}" for o in options if o.given)
        why = "; ".join(f"{name}: {reason}" for name, (_, reason) in refused.items())
        raise ValidationError(
            {
                "replicas": f"only {len(chosen)} of {count} replicas can be placed now ({where}"
                + (f"; no room on {why}" if why else "")
                + "): ask for fewer replicas, or free GPUs or host memory first"
            }
        )
    check_team_quota(
        data.team, sum(row.gpu_count for row in chosen), exclude=data.replaces, field="replicas"
    )
    for index, row in enumerate(chosen):
        row.replica_index = index
        row.replicas = count if index == 0 else 1
    return chosen


def _room(row: Deployment, count: int) -> tuple[int, str]:
    """How many replicas like ``row`` its host can take now (up to ``count``), and why not
    more."""
    if row.gpu_count:
        slots, why_not = replica_slots(row, limit=count)
        return len(slots), why_not
    if not row.host_memory_bytes:  # the stand-in: holds nothing
        return count, ""
    free = host_memory.free_bytes(row.host)
    if free is None:
        return 0, "its agent has not reported the host's memory yet"
    room = min(free // row.host_memory_bytes, count)
    gib = host_memory.GIB
    why = f"{free / gib:.1f} GiB free for CPU engines, {row.host_memory_bytes / gib:.1f} GiB each"
    return room, why


def _spread(options: list[_Option], count: int) -> list[Deployment]:
    """One replica at a time to the host with the fewest so far, most room left first."""
    chosen: list[Deployment] = []
    while len(chosen) < count:
        open_ = [o for o in options if o.given < o.room]
        if not open_:
            break
        best = min(open_, key=lambda o: (o.given, -(o.room - o.given), o.host.name))
        chosen.append(_another(best.row) if best.given else best.row)
        best.given += 1
    return chosen


def _another(row: Deployment) -> Deployment:
    """A further replica like ``row`` on the same host: a row of its own, with its own public
    id (a copy would share the first one's, and the database refuses the second insert)."""
    clone = copy.copy(row)
    clone.public_id = uuid.uuid4()
    clone.plan = copy.deepcopy(row.plan)
    return clone


def _nowhere(refused: dict[str, tuple[ValidationError | None, str]], count: int) -> Exception:
    """No host can take a replica: the one host's own refusal, or every host's reason."""
    errors = [exc for exc, _ in refused.values() if exc is not None]
    reasons = {reason for _, reason in refused.values()}
    if errors and len(reasons) == 1:
        return errors[0]  # the same refusal everywhere: the request's own field and fix
    listed = "; ".join(f"{name}: {reason}" for name, (_, reason) in refused.items())
    what = "the deployment" if count == 1 else f"any of the {count} replicas"
    return ValidationError(
        {"host": f"no host can take {what} now ({listed}); free GPUs or choose a host"}
    )
