"""Telling open pages that a deployment changed: one Redis pub/sub message per committed change.

Writers (``Deployment.transition``, the launcher, the prewarm) call :func:`publish`; the page's
Server-Sent Events stream (``deployments.web.stream``) subscribes to :func:`channel`::

    publish(deployment.pk)  # sent once the current transaction commits
"""

from __future__ import annotations

import json
import logging
import uuid

from django.conf import settings
from django.db import transaction
from redis.exceptions import RedisError

from core import naming
from core.queues import redis_connection

logger = logging.getLogger(__name__)


def channel(deployment_pk: int) -> str:
    """The deployment's pub/sub channel on this console (see ``core.naming``)."""
    return naming.deployment_channel(deployment_pk, settings.BERTH_INSTANCE)


def publish(deployment_pk: int, kind: str = "changed") -> None:
    """Tell open pages that the deployment changed, once the current transaction commits. A
    Redis hiccup loses only a push: pages also poll."""

    def send() -> None:
        try:
            message = json.dumps({"kind": kind, "id": uuid.uuid4().hex})
            redis_connection().publish(channel(deployment_pk), message)
        except RedisError as exc:
            logger.warning("could not publish deployment %s change: %s", deployment_pk, exc)

    transaction.on_commit(send)
