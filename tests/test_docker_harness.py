"""The Docker engine the suite runs against: local images only, and the GPU error it gives."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

pytestmark = pytest.mark.docker


def test_busybox_image_runs_a_command(docker_client: Any, busybox_image: str) -> None:
    output = docker_client.containers.run(busybox_image, ["echo", "berth"], remove=True)
    assert output == b"berth\n"


def test_gpu_device_requests_fail_on_a_machine_without_the_nvidia_runtime(
    docker_client: Any, busybox_image: str
) -> None:
    """The real error a GPU request gets here; the launcher must turn it into a clear message."""
    from docker.types import DeviceRequest

    import docker

    name = f"berth-test-gpu-{uuid.uuid4().hex[:8]}"
    with pytest.raises(docker.errors.APIError, match="could not select device driver"):
        docker_client.containers.run(
            busybox_image,
            ["true"],
            name=name,
            remove=True,
            device_requests=[DeviceRequest(device_ids=["0"], capabilities=[["gpu"]])],
        )
    leftovers = docker_client.containers.list(all=True, filters={"name": name})
    for container in leftovers:
        container.remove(force=True)
