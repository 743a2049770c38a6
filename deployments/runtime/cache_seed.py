"""A new replica's compile cache, seeded from another replica's on the same host.

Each replica has its own cache volume (``core.naming.cache_volume``), so a replica added by the
scaler would compile the model again — minutes on CPUs, and silent (no log line), while the
replicas already serving share its cores. Before its first container is created, the launch
copies the cache of a replica of the same deployment on the same host into the new volume (a
short-lived container of the engine image, no network, the source read-only); vLLM and
torch.compile then find their artifacts as on a restart::

    seeded = seed_cache(engine, deployment, image)   # "" when there was nothing to do

Nothing else is copied: the cache holds compiled code for this model, engine and flags only,
and the deployment's replicas share all three.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings

import docker
from core import naming
from deployments.models import Deployment, DeploymentEvent, EventKind
from deployments.runtime.engine_host import EngineHost

logger = logging.getLogger(__name__)
SEED_TIMEOUT_S = 300


def seed_cache(engine: EngineHost, deployment: Deployment, image: str | None = None) -> str:
    """Copy a sibling replica's cache volume into ``deployment``'s when it has none yet; what
    was done ("" for nothing). Never fails the launch: a copy that fails leaves the engine to
    compile, as it would have."""
    instance = settings.BERTH_INSTANCE
    target = naming.cache_volume(deployment.pk, instance)
    if _exists(engine, target):
        return ""
    source_row = _sibling_with_cache(engine, deployment)
    if source_row is None:
        return ""
    source = naming.cache_volume(source_row.pk, instance)
    try:
        _copy(engine, deployment, image or deployment.image.reference, source, target)
    except docker.errors.DockerException as exc:
        logger.warning("seeding the compile cache of %s failed: %s", deployment, exc)
        return ""
    message = (
        f"compile cache seeded from replica {source_row.replica_index + 1}'s on "
        f"{deployment.host.name} (no compile on start)"
    )
    DeploymentEvent.objects.create(
        deployment=deployment,
        generation=deployment.generation,
        kind=EventKind.PROGRESS,
        message=message,
        data={"source_volume": source, "volume": target},
    )
    return message


def _exists(engine: EngineHost, volume: str) -> bool:
    try:
        engine.client.volumes.get(volume)
    except docker.errors.NotFound:
        return False
    return True


def _sibling_with_cache(engine: EngineHost, deployment: Deployment) -> Deployment | None:
    if deployment.replica_of_id is None and not deployment.replica_rows.exists():
        return None
    siblings = deployment.group().exclude(pk=deployment.pk).filter(host_id=deployment.host_id)
    for sibling in siblings:
        if _exists(engine, naming.cache_volume(sibling.pk, settings.BERTH_INSTANCE)):
            return sibling
    return None


def _copy(engine: EngineHost, deployment: Deployment, image: str, source: str, target: str) -> Any:
    labels = naming.volume_labels(
        instance=settings.BERTH_INSTANCE, deployment_id=deployment.pk, team=deployment.team.slug
    )
    engine.client.volumes.create(name=target, labels=labels)
    return engine.client.containers.run(
        image,
        entrypoint=["cp"],
        command=["-R", "/from/.", "/to/"],
        name=f"{deployment.container_name}-seed",
        volumes={source: {"bind": "/from", "mode": "ro"}, target: {"bind": "/to", "mode": "rw"}},
        network_mode="none",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true"],
        remove=True,
        stdout=False,
        stderr=True,
    )
