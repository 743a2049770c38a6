"""Rows a deployment needs, built directly (the registry and inventory have their own tests)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import docker.errors
from django.conf import settings

from accounts.models import Team
from deployments.models import Deployment, EngineImage
from deployments.planning import GIB, PlanRequest, plan
from deployments.planning.stored import StoredPlan
from deployments.runtime.engine_host import EngineHost
from gpus.models import Gpu, Host
from models_registry.models import Model, StorageMount
from models_registry.tiny_model import LLAMA_CONFIG


def host_with_gpus(name: str = "gpu-01", count: int = 4, memory_mib: int = 81_559) -> Host:
    host = Host.objects.create(name=name)
    for index in range(count):
        Gpu.objects.create(
            host=host,
            index=index,
            uuid=f"GPU-{name}-{index}",
            name="NVIDIA H100 80GB HBM3",
            memory_total_mib=memory_mib,
        )
    return host


def registered_model(team: Team, root: Path, name: str = "llama") -> Model:
    mount, _ = StorageMount.objects.get_or_create(
        name="store",
        defaults={
            "canonical_prefix": "/store",
            "local_path": str(root),
            "host_path": str(root),
            "container_path": "/models",
        },
    )
    # The tiny Llama's config, as inspection stores it: the launch job plans the model again
    # (the rules of a new request, issue 15 finding 6).
    model = Model(
        team=team,
        mount=mount,
        path=f"/store/{team.slug}/{name}",
        status="ok",
        config=dict(LLAMA_CONFIG),
    )
    model.save()
    return model


def engine_image(reference: str = "vllm/vllm-openai:v0.11.0") -> EngineImage:
    image, _ = EngineImage.objects.get_or_create(name="vllm", defaults={"reference": reference})
    return image


def planned(
    *, max_model_len: int | None = None, gpu_memory_utilization: float = 0.9, gpu_gib: int = 80
) -> dict[str, Any]:
    """A stored plan for the tiny Llama on one GPU of ``gpu_gib`` GiB, made by the planner as the
    deploy service makes it (never a dict written by hand)."""
    request = PlanRequest(
        gpu_memory_bytes=gpu_gib * GIB,
        gpus_on_host=1,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
    )
    stored = StoredPlan.from_plan(
        plan(LLAMA_CONFIG, request), gpu_memory_utilization=gpu_memory_utilization
    )
    return stored.to_json()


def deployment(
    team: Team, model: Model, host: Host, name: str = "llama", gpu_count: int = 1
) -> Deployment:
    return Deployment.objects.create(
        name=name,
        team=team,
        model=model,
        host=host,
        image=engine_image(),
        gpu_count=gpu_count,
    )


def on_host(step: Callable[..., Any], deployment: Deployment, *args: Any, **kwargs: Any) -> Any:
    """Run a launcher step as its job does: with the host's engine, closed afterwards."""
    with EngineHost.of(deployment.host) as engine:
        return step(engine, deployment, *args, **kwargs)


def _remove_container(container: Any) -> None:
    """Remove ``container``; one the launch is removing already is waited for (deadline 30 s)."""
    try:
        container.remove(force=True)
        return
    except docker.errors.NotFound:
        return
    except docker.errors.APIError as error:
        if "in progress" not in str(error):
            raise
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            container.reload()
        except docker.errors.NotFound:
            return
        time.sleep(0.1)
    raise AssertionError(f"container {container.name} was still being removed after 30 s")


def remove_engines(docker_client: Any, deployments: Iterable[Deployment]) -> None:
    """Remove what launches of ``deployments`` left on the engine: containers and cache volumes."""
    for deployment in deployments:
        for container in docker_client.containers.list(
            all=True, filters={"name": deployment.container_name}
        ):
            _remove_container(container)
        for volume in docker_client.volumes.list(
            filters={"name": f"{settings.BERTH_INSTANCE}-cache-{deployment.pk}"}
        ):
            # A container the launch was still removing (or one under another name) can hold the
            # volume: remove whatever uses it first, or the volume answers 409 "in use".
            for user in docker_client.containers.list(all=True, filters={"volume": volume.name}):
                _remove_container(user)
            volume.remove(force=True)
