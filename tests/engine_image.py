"""The Berth test engine (``docker/test-engine/``): a stand-in for vllm/vllm-openai. NOT vLLM.

It is invoked like the real image (``ENTRYPOINT ["vllm", "serve"]``, then vLLM's CLI flags),
prints vLLM's log milestones, refuses connections while "loading", then answers ``/health``,
``/v1/models``, ``/metrics``; ``ENGINE_*`` environment variables make it fail like vLLM does.
See ``docker/test-engine/README.md``.

``tests/conftest.py`` imports the ``engine_image`` fixture, so every test module can use it.
The image is built by ``deployments.runtime.stand_in`` (``manage.py berth_demo`` builds it the same
way), locally ``FROM scratch`` with Debian's static busybox, once per machine.
"""

from __future__ import annotations

import http.client
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from deployments.runtime.stand_in import (
    BUSYBOX,
    ENGINE_PORT,
    INSTALL_BUSYBOX,
    build_engine_image,
    engine_health_command,
)
from tests.conftest import service_missing


def engine_healthcheck(port: int = ENGINE_PORT) -> list[str]:
    """The exec-form health check test for the engine container (Docker's ``CMD`` form)."""
    return ["CMD", *engine_health_command(port)]


@pytest.fixture(scope="session")
def engine_image(docker_client: Any) -> str:
    """The test engine image's tag, built once per machine."""
    if not BUSYBOX.exists():
        service_missing(f"{BUSYBOX} is missing ({INSTALL_BUSYBOX})")
    return build_engine_image(docker_client)


@contextmanager
def running_engine(
    client: Any, image: str, args: list[str], env: dict[str, str] | None = None, **kwargs: Any
) -> Iterator[Any]:
    """Start the engine detached (named ``berth-test-engine-*``); always removed afterwards."""
    name = f"berth-test-engine-{uuid.uuid4().hex[:10]}"
    container = client.containers.run(
        image, args, name=name, environment=env or {}, detach=True, **kwargs
    )
    try:
        yield container
    finally:
        container.remove(force=True)


def container_ip(container: Any) -> str:
    """The container's address on the default bridge network (reachable from this host)."""
    container.reload()
    return container.attrs["NetworkSettings"]["IPAddress"]


def http_get(host: str, path: str, port: int = ENGINE_PORT) -> tuple[int, dict[str, str], bytes]:
    """One GET; raises ``ConnectionRefusedError`` when nothing listens (the engine is loading)."""
    connection = http.client.HTTPConnection(host, port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        headers = {key.lower(): value for key, value in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        connection.close()


def probe_health(host: str, port: int = ENGINE_PORT) -> int | None:
    """``/health``'s status, or None while connections are refused."""
    try:
        return http_get(host, "/health", port)[0]
    except ConnectionRefusedError:
        return None


def wait_until[T](
    check: Callable[[], T], timeout: float = 20.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll ``check`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or check}")
        time.sleep(interval)


def logs(container: Any) -> str:
    """stdout and stderr together, as ``docker logs`` shows them."""
    return container.logs(stdout=True, stderr=True).decode()
