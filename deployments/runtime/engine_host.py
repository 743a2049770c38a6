"""One GPU host's Docker engine, opened for one job and closed after it: the adapter that launch,
watch, stop, delete, reconcile and garbage collection are given::

    with EngineHost.of(deployment.host) as engine:
        launcher.watch(engine, deployment, generation)

It owns the connection (closed when the block ends, whatever happens inside) and the few engine
operations Berth repeats: find a container, remove one, list this console's, remove a volume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings

import docker
from core import naming
from gpus import collectors


class EngineHost:
    """A Docker client for one host, and the operations Berth repeats on it. ``client`` is the
    Docker SDK client itself, for what only one caller does."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client

    @classmethod
    @contextlib.contextmanager
    def of(cls, host: Any) -> Iterator[EngineHost]:
        """The engine of ``host`` (its ``docker_endpoint``), closed when the block ends."""
        client = collectors.docker_client(host.docker_endpoint)
        try:
            yield cls(client)
        finally:
            client.close()

    def container(self, name_or_id: str) -> Any | None:
        """The container, or None when the engine has none by that name or id (or is removing
        it: see :func:`gone`)."""
        try:
            return self.client.containers.get(name_or_id)
        except docker.errors.APIError as exc:
            if gone(exc):
                return None
            raise

    def remove_container(self, name_or_id: str) -> None:
        """Remove the container (running or not); nothing to do when it is gone."""
        container = self.container(name_or_id)
        if container is not None:
            remove_quietly(container)

    def containers(self, **filters: str) -> list[Any]:
        """This console's containers (``BERTH_INSTANCE``), running or not, with extra filters."""
        ours = {**naming.instance_filter(settings.BERTH_INSTANCE), **filters}
        return self.client.containers.list(all=True, filters=ours)

    def remove_volume(self, name: str) -> None:
        """Remove the volume; nothing to do when it is gone."""
        with contextlib.suppress(docker.errors.NotFound):
            self.client.volumes.get(name).remove(force=True)


def gone(exc: docker.errors.APIError) -> bool:
    """Whether Docker's error means the container is gone: 404, or 409 while ``docker rm -f``
    removes it ("dead or marked for removal", "removal of container ... is already in
    progress") — a watcher crashed on the 409 (issue 15, finding 12)."""
    if isinstance(exc, docker.errors.NotFound):
        return True
    text = str(exc.explanation or exc)
    return exc.status_code == 409 and ("marked for removal" in text or "removal of" in text)


def remove_quietly(container: Any) -> None:
    """``container.remove(force=True)``; nothing to do when it is gone or going."""
    try:
        container.remove(force=True)
    except docker.errors.APIError as exc:
        if not gone(exc):
            raise


LOCAL_DOCKER_SCHEMES = frozenset({"", "unix", "npipe"})


def engine_address(docker_endpoint: str) -> str:
    """Where a gateway reaches the engines of a host: the host named in its Docker endpoint
    (``tcp://gpu-01:2376`` → ``gpu-01``), or, for a local socket, ``BERTH_ENGINE_BIND`` (the
    address engines publish on; a wildcard bind is reached on the loopback)."""
    parts = urlsplit(docker_endpoint or "")
    if parts.scheme not in LOCAL_DOCKER_SCHEMES and parts.hostname:
        return f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    bind = settings.BERTH_ENGINE_BIND
    if bind in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard is not an address to dial
        return "127.0.0.1"
    return f"[{bind}]" if ":" in bind else bind
