"""Every name Berth gives to something outside its database: containers, volumes, labels, job
ids, pub/sub channels and Redis keys. Written once here, below every app, so the launcher that
creates a container, the reconcile and garbage collection that find it again and the GPU
inventory that attributes its processes cannot drift apart::

    container_name(12, 3, "berth")          # "berth-12-g3"
    labels(instance="berth", deployment_id=12, generation=3, team="team-a")
    deployment_job_id("launch", 12, 3)      # "launch-12-3"

``instance`` is ``BERTH_INSTANCE``: it keeps two consoles on one Docker engine or one Redis apart.
"""

from __future__ import annotations

LABEL_PREFIX = "berth."
MANAGED_LABEL = f"{LABEL_PREFIX}managed"
INSTANCE_LABEL = f"{LABEL_PREFIX}instance"
DEPLOYMENT_LABEL = f"{LABEL_PREFIX}deployment"
GENERATION_LABEL = f"{LABEL_PREFIX}generation"
TEAM_LABEL = f"{LABEL_PREFIX}team"
# The short-lived nvidia-smi container of the GPU inventory's last source.
PROBE_LABEL = f"{LABEL_PREFIX}probe"


def container_name(deployment_id: int, generation: int, instance: str) -> str:
    """Deterministic, so a retried launch finds the container an earlier attempt created."""
    return f"{instance}-{deployment_id}-g{generation}"


def cache_volume(deployment_id: int, instance: str) -> str:
    """The writable per-deployment cache volume; kept across generations, removed on delete."""
    return f"{instance}-cache-{deployment_id}"


def labels(*, instance: str, deployment_id: int, generation: int, team: str) -> dict[str, str]:
    """The labels of an engine container: who owns it, for which deployment and generation."""
    return {
        MANAGED_LABEL: "true",
        INSTANCE_LABEL: instance,
        DEPLOYMENT_LABEL: str(deployment_id),
        GENERATION_LABEL: str(generation),
        TEAM_LABEL: team,
    }


def volume_labels(*, instance: str, deployment_id: int, team: str) -> dict[str, str]:
    """The labels of a deployment's cache volume (it outlives generations): an operator lists
    or prunes Berth's volumes with ``docker volume ls --filter label=berth.instance=…``."""
    return {
        MANAGED_LABEL: "true",
        INSTANCE_LABEL: instance,
        DEPLOYMENT_LABEL: str(deployment_id),
        TEAM_LABEL: team,
    }


def instance_filter(instance: str) -> dict[str, str]:
    """The Docker list filter for the containers of one console (``instance``)."""
    return {"label": f"{INSTANCE_LABEL}={instance}"}


def deployment_of(container_labels: dict[str, str] | None) -> str:
    """The deployment id a container is labelled with ('' for containers that are not ours)."""
    return (container_labels or {}).get(DEPLOYMENT_LABEL, "")


def generation_of(container_labels: dict[str, str] | None) -> int:
    """The generation a container is labelled with (0 when unlabelled)."""
    return int((container_labels or {}).get(GENERATION_LABEL, "0") or 0)


def deployment_job_id(kind: str, deployment_id: int, generation: int) -> str:
    """The one job id of a deployment's ``launch``/``watch``/``stop``/``delete`` job for one
    generation: a duplicate enqueue replaces the job instead of running it twice, and reconcile
    finds a lost job by it."""
    return f"{kind}-{deployment_id}-{generation}"


def sync_job_id(mount_id: int) -> str:
    """The job id of a storage mount's sync."""
    return f"sync-mount-{mount_id}"


def deployment_channel(deployment_id: int, instance: str) -> str:
    """Pub/sub channels are server-wide (no database number applies), so the name carries the
    instance: two consoles — or a test run and a console — on one Redis never cross."""
    return f"berth:{instance}:deployment:{deployment_id}"


def periodic_claim_key(job_name: str, instance: str, scope: str = "") -> str:
    """The Redis key that lets one process claim a run of a periodic job for one interval."""
    return f"berth:{instance}:periodic:{job_name}" + (f":{scope}" if scope else "")


def redis_epoch_key(instance: str, host: str) -> str:
    """A key an agent keeps in Redis: when it is missing, Redis lost its data (a restart
    without persistence, a flush) and the agent books every periodic job again."""
    return f"berth:{instance}:agent-epoch:{host}"


def deployment_channel_pattern(instance: str) -> str:
    """Every deployment's channel, for ``PSUBSCRIBE`` (the gateway reloads its routes on any)."""
    return deployment_channel(0, instance).rsplit(":", 1)[0] + ":*"


def api_keys_channel(instance: str) -> str:
    """Pub/sub channel of API key and team-limit changes (the gateways reload their keys)."""
    return f"berth:{instance}:gateway:keys"


def gateway_key(instance: str, *parts: str | int) -> str:
    """A Redis key of the gateway's: limit counters (``rpm``, ``tpm``, ``budget``), the usage
    stream (``usage``), throttling markers (``denied``)."""
    return ":".join([f"berth:{instance}:gateway", *map(str, parts)])
