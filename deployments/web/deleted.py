"""What the URL of a deleted deployment says: that it was deleted, when and by whom — to those
who could see it before (its team's members and admins); everyone else gets the usual 404,
which does not tell another team's deployment from one that never existed.

The row is gone, so the audit trail answers: the launcher records ``deployment.deleted`` with
the deployment's public id, actor and team.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from accounts.access import team_ids
from audit.actions import Action
from audit.models import AuditEvent


@dataclass(frozen=True)
class Deleted:
    """A deployment as its deletion was recorded."""

    name: str  # "team/name"
    team_slug: str
    time: datetime
    by: str  # who asked (the job that deleted it carried their name)
    seq: int  # the audit event, for a link


def find_deleted(public_id: uuid.UUID, user: Any) -> Deleted | None:
    """The recorded deletion of ``public_id`` if ``user`` may know of it, else None. One query
    on the (action, seq) index; deletions are few."""
    event = (
        AuditEvent.objects.filter(
            action=Action.DEPLOYMENT_DELETED,
            payload_json__contains=f'"public_id":"{public_id}"',
        )
        .order_by("-seq")
        .first()
    )
    if event is None or not _may_know(user, event):
        return None
    return Deleted(event.target_repr, event.team_slug, event.time, event.actor_name, event.seq)


def _may_know(user: Any, event: AuditEvent) -> bool:
    if getattr(user, "is_admin", False):
        return True
    return event.team_id is not None and event.team_id in team_ids(user)
