"""Registering hosts: the one audited way a host row is created or changed.

::

    host, created = register_host("gpu-01", docker_endpoint="tcp://gpu-01:2376", labels={...})
"""

from __future__ import annotations

import socket
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction

import audit
from audit.actions import Action
from gpus.models import Host, host_name_validator


def register_host(
    name: str, *, docker_endpoint: str = "", labels: dict[str, str] | None = None
) -> tuple[Host, bool]:
    """Create the host, or update its endpoint and labels; audited either way. Returns
    ``(host, created)``. Raises ValidationError for a name that cannot be a queue name."""
    host_name_validator(name)
    with transaction.atomic():
        host, created = Host.objects.select_for_update().get_or_create(
            name=name, defaults={"docker_endpoint": docker_endpoint, "labels": labels or {}}
        )
        if created:
            audit.record(
                Action.HOST_REGISTERED,
                target=host,
                docker_endpoint=docker_endpoint,
                labels=host.labels,
                queue=host.queue_name,
            )
            return host, True
        changes = _changes(host, docker_endpoint, labels)
        if changes:
            for field, (_old, new) in changes.items():
                setattr(host, field, new)
            host.save(update_fields=list(changes))
            audit.record(
                Action.HOST_UPDATED,
                target=host,
                changes={field: {"from": old, "to": new} for field, (old, new) in changes.items()},
            )
    return host, False


def _changes(
    host: Host, docker_endpoint: str, labels: dict[str, str] | None
) -> dict[str, tuple[Any, Any]]:
    changes: dict[str, tuple[Any, Any]] = {}
    if docker_endpoint != host.docker_endpoint:
        changes["docker_endpoint"] = (host.docker_endpoint, docker_endpoint)
    if labels is not None and labels != host.labels:
        changes["labels"] = (host.labels, labels)
    return changes


def local_host_name() -> str:
    """The name the embedded set-up registers this machine under: BERTH_LOCAL_HOST_NAME, else
    the machine's host name made into a valid queue name."""
    configured = settings.BERTH_LOCAL_HOST_NAME
    if configured:
        return configured
    raw = socket.gethostname().split(".")[0].lower()
    cleaned = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in raw).strip("-")
    name = cleaned[:64] or "local"
    try:
        host_name_validator(name)
    except ValidationError:
        return "local"
    return name
