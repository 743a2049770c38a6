"""Garbage collection on a GPU host: builder cache, exited Berth containers, cache volumes of
deleted deployments, dangling images.

The builder cache is pruned by the Docker CLI run exec-style (an argument list with an absolute
binary, a timeout, a minimal environment; never a shell, which is what the field report's
garbage collector got wrong). Containers and images go through the Docker SDK. Containers
of live deployments and the images they use are never touched. The result is audited::

    with EngineHost.of(host) as engine:
        result = collect(engine, live_deployments={"12", "15"}, host=host.name)
    result.bytes_reclaimed
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

from django.conf import settings

import audit
import docker
from audit.actions import Action, Outcome
from core import naming
from deployments.models import Deployment
from deployments.runtime.engine_host import EngineHost

BUILDER_PRUNE_TIMEOUT_S = 300
DEFAULT_BUILDER_AGE_HOURS = 24
_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}  # fmt: skip
_RECLAIMED = re.compile(r"Total(?: reclaimed space)?:\s*([0-9.]+)\s*([kKMGT]?i?B)")


class GcError(Exception):
    """A collection step failed; the message says which and why."""


@dataclass
class GcResult:
    builder_bytes: int = 0
    image_bytes: int = 0
    containers_removed: list[str] = field(default_factory=list)
    volumes_removed: list[str] = field(default_factory=list)
    images_removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def bytes_reclaimed(self) -> int:
        return self.builder_bytes + self.image_bytes


def parse_reclaimed(output: str) -> int:
    """Bytes from ``docker builder prune`` output ("Total reclaimed space: 1.2GB"; older
    clients print "Total:  1.2GB"); 0 when it reports nothing."""
    match = _RECLAIMED.search(output)
    if match is None:
        return 0
    number, unit = match.groups()
    return round(float(number) * _UNITS[unit.upper()])


def docker_cli() -> str:
    """The absolute path of the Docker CLI, or GcError naming the fix."""
    path = shutil.which("docker")
    if path is None:
        raise GcError(
            "the docker CLI is not installed on this host; install docker-ce-cli (or docker.io)"
        )
    return os.path.abspath(path)


def prune_builder_cache(older_than_hours: int = DEFAULT_BUILDER_AGE_HOURS) -> int:
    """Prune build cache older than ``older_than_hours``; returns the bytes reclaimed."""
    if not isinstance(older_than_hours, int) or older_than_hours < 0:
        raise GcError(
            f"older_than_hours must be a non-negative whole number, got {older_than_hours!r}"
        )
    argv = [docker_cli(), "builder", "prune", "--force", "--filter", f"until={older_than_hours}h"]
    environment = {
        key: os.environ[key]
        for key in ("PATH", "DOCKER_HOST", "DOCKER_CONFIG", "HOME")
        if key in os.environ
    }
    try:
        completed = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=BUILDER_PRUNE_TIMEOUT_S,
            env=environment,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise GcError(
            f"docker builder prune did not finish within {BUILDER_PRUNE_TIMEOUT_S} s"
        ) from None
    if completed.returncode != 0:
        raise GcError(
            f"docker builder prune failed ({completed.returncode}): "
            f"{completed.stderr.strip()[:500]}"
        )
    return parse_reclaimed(completed.stdout)


def remove_exited_containers(engine: EngineHost, live_deployments: Collection[str]) -> list[str]:
    """Remove this console's stopped containers, except those of live deployments; returns
    their names. Containers of another Berth instance on the same engine are not touched."""
    removed = []
    for status in ("exited", "dead", "created"):
        for container in engine.containers(status=status):
            if naming.deployment_of(container.labels) in live_deployments:
                continue
            container.remove(v=False, force=True)
            removed.append(container.name)
    return removed


def remove_orphan_volumes(engine: EngineHost) -> list[str]:
    """Remove this console's cache volumes whose deployment has no record any more (a delete
    job that was lost after the record went: a further replica's record goes with its first
    replica's); returns their names. A recorded deployment's volume stays, stopped or not (its
    restart reuses it), and so does a volume a container still uses.

    The volumes are listed before the records are read: a record is made before its launch
    creates the volume and ids are never reused, so a listed volume without a record is one
    whose deployment was deleted."""
    instance = settings.BERTH_INSTANCE
    volumes = engine.client.volumes.list(filters={"label": f"{naming.INSTANCE_LABEL}={instance}"})
    owners = {
        volume.name: owner
        for volume in volumes
        if (owner := (volume.attrs.get("Labels") or {}).get(naming.DEPLOYMENT_LABEL, "")).isdigit()
    }
    recorded = {
        str(pk)
        for pk in Deployment.objects.filter(
            pk__in={int(owner) for owner in owners.values()}
        ).values_list("pk", flat=True)
    }
    removed = []
    for name, owner in owners.items():
        if owner in recorded or name != naming.cache_volume(int(owner), instance):
            continue
        try:
            engine.client.volumes.get(name).remove()
        except docker.errors.NotFound:
            continue
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # in use by a container: not an orphan yet
                continue
            raise
        removed.append(name)
    return removed


def remove_dangling_images(client: Any) -> tuple[list[str], int]:
    """Remove untagged images no container uses (tagged images, such as engines in use, stay)."""
    report = client.images.prune(filters={"dangling": True}) or {}
    deleted = [
        entry.get("Deleted") or entry.get("Untagged") for entry in report.get("ImagesDeleted") or []
    ]
    return [item for item in deleted if item], int(report.get("SpaceReclaimed") or 0)


def collect(
    engine: EngineHost,
    *,
    live_deployments: Collection[str] = (),
    builder_age_hours: int = DEFAULT_BUILDER_AGE_HOURS,
    host: str = "",
) -> GcResult:
    """Run every step, carrying on past a failed one; record the outcome as ``gc.ran``."""
    result = GcResult()
    try:
        result.builder_bytes = prune_builder_cache(builder_age_hours)
    except GcError as exc:
        result.errors.append(str(exc))
    try:
        result.containers_removed = remove_exited_containers(engine, set(live_deployments))
        result.volumes_removed = remove_orphan_volumes(engine)
        result.images_removed, result.image_bytes = remove_dangling_images(engine.client)
    except Exception as exc:  # the Docker SDK raises several unrelated types (API, connection)
        result.errors.append(f"{type(exc).__name__}: {exc}"[:500])
    audit.record(
        Action.GC_RAN,
        outcome=Outcome.FAILED if result.errors else Outcome.OK,
        host=host,
        bytes_reclaimed=result.bytes_reclaimed,
        **asdict(result),
    )
    return result
