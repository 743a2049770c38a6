"""One inventory round of a host: collect from the first source that answers, attribute GPU
processes to containers, store the result and the heartbeat::

    collection = collect_round(host)   # host is refreshed from the database afterwards
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from gpus.attribution import attribute
from gpus.collectors import collect, docker_client, nvidia_runtime_available
from gpus.inventory import store_collection
from gpus.models import Host
from gpus.readings import Collection, Source, SourceFailure

log = logging.getLogger(__name__)

ATTRIBUTION = "docker-attribution"


def collect_round(
    host: Host, *, sources: tuple[str, ...] = Source.ORDER, client: Any = None
) -> Collection:
    """Collect once, attribute processes to containers, store; ``host`` is refreshed. A Docker
    client the round opened itself is closed before it returns."""
    given = client
    client, client_error = _client(host, client)
    try:
        return _round(host, sources, client, client_error)
    finally:
        if given is None and client is not None:
            client.close()


def _round(host: Host, sources: tuple[str, ...], client: Any, client_error: str) -> Collection:
    collection = collect(host.docker_endpoint, sources=sources, client=client)
    if client_error and Source.DOCKER_SMI in sources:
        collection = _replace_failure(collection, Source.DOCKER_SMI, client_error)
    collection = _attributed(collection, client, client_error)
    runtime = None
    if client is not None:
        try:
            runtime = nvidia_runtime_available(client)
        except Exception as exc:  # an engine that answers ping but not info
            log.warning("docker info failed on %s: %s", host.name, exc)
    store_collection(host, collection, nvidia_runtime=runtime)
    host.refresh_from_db()
    return collection


def _client(host: Host, client: Any) -> tuple[Any, str]:
    if client is not None:
        return client, ""
    made = None
    try:
        made = docker_client(host.docker_endpoint)
        made.ping()
    except Exception as exc:  # docker raises several unrelated types when the engine is absent
        if made is not None:
            made.close()  # the failed ping's connection pool would otherwise leak a socket
        endpoint = host.docker_endpoint or "the local engine"
        return None, f"Docker is not reachable at {endpoint}: {exc}"[:500]
    return made, ""


def _replace_failure(collection: Collection, source: str, error: str) -> Collection:
    failures = tuple(
        SourceFailure(source, error) if failure.source == source else failure
        for failure in collection.failures
    )
    return replace(collection, failures=failures)


def _attributed(collection: Collection, client: Any, client_error: str) -> Collection:
    """Map GPU processes to containers. Without Docker every process stays unattributed, so
    all of its memory counts as foreign: the safe side for placement."""
    if collection.inventory is None or not any(g.processes for g in collection.inventory.gpus):
        return collection
    if client is None:
        note = SourceFailure(ATTRIBUTION, client_error)
        return replace(collection, failures=(*collection.failures, note))
    try:
        return replace(collection, inventory=attribute(collection.inventory, client))
    except Exception as exc:  # attribution is best effort; the reading itself stands
        note = SourceFailure(ATTRIBUTION, f"{type(exc).__name__}: {exc}"[:500])
        return replace(collection, failures=(*collection.failures, note))
