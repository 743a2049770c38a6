"""Allow-listing a locally built real engine image as a CPU engine (audited), shared by
``manage.py build_engine_image --allow-list NAME`` and ``manage.py berth_demo``::

    allow_list_cpu_engine("vllm-cpu", "berth/vllm-cpu:0.32.0-3f2a9c1d07be", "0.32.0")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db import transaction

import audit
from audit.actions import Action
from deployments.models import EngineImage

# vLLM's own image has curl, and so does the recipe's (docker/vllm-cpu/recipe.toml).
HEALTH_COMMAND = [
    "curl",
    "-fsS",
    "-o",
    "/dev/null",
    "--max-time",
    "5",
    "http://127.0.0.1:8000/health",
]


def save_cpu_engine(
    name: str, wanted: dict[str, Any], current: Callable[[EngineImage], bool] | None = None
) -> bool | None:
    """Create or update allow-list entry ``name`` with the ``wanted`` fields, audited, in one
    transaction. None when ``current(image)`` (default: every wanted field already holds) says
    the entry needs no change; else whether it was created."""
    with transaction.atomic():
        image = EngineImage.objects.select_for_update().filter(name=name).first()
        if image is not None and (current or _holds(wanted))(image):
            return None
        created = image is None
        image = image or EngineImage(name=name)
        for key, value in wanted.items():
            setattr(image, key, value)
        image.full_clean()
        image.save()
        audit.record(
            Action.ENGINE_IMAGE_SAVED,
            target=image,
            created=created,
            reference=image.reference,
            enabled=True,
            gpu_capable=False,
            cpu_capable=True,
            environment=sorted(image.environment),
        )
    return created


def _holds(wanted: dict[str, Any]) -> Callable[[EngineImage], bool]:
    return lambda image: all(getattr(image, key) == value for key, value in wanted.items())


def allow_list_cpu_engine(name: str, reference: str, engine_version: str) -> str:
    """Create or update allow-list entry ``name`` for ``reference`` as a CPU-capable, real
    (not stand-in) engine; returns one line saying what changed. Idempotent."""
    wanted = {
        "reference": reference,
        "description": f"vLLM {engine_version} for x86 CPUs, built by build_engine_image",
        "gpu_capable": False,
        "cpu_capable": True,
        "is_stand_in": False,
        "health_command": HEALTH_COMMAND,
        "enabled": True,
    }
    created = save_cpu_engine(name, wanted)
    if created is None:
        return f"engine image '{name}' ({reference}): already allow-listed"
    verb = "allow-listed" if created else "updated to the current build"
    return f"engine image '{name}' ({reference}): {verb} (CPU, vLLM {engine_version})"
