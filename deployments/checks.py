"""System checks for the engine image allow-list (run by ``check --deploy``)."""

from __future__ import annotations

from typing import Any

from django.core.checks import Tags, Warning, register
from django.db import DatabaseError

from deployments.models import EngineImage


@register(Tags.security, deploy=True)
def check_images_pinned(app_configs: Any, **kwargs: Any) -> list[Warning]:
    """Every enabled vLLM image should be pinned ``@sha256:``: a tag can be moved to other
    content on the registry or on a host. Stand-ins are exempt."""
    try:
        images = list(EngineImage.objects.filter(enabled=True, is_stand_in=False))
    except DatabaseError:  # not migrated yet: nothing to check
        return []
    return [
        Warning(
            f"engine image {image.name!r} ({image.reference}) is not pinned by digest",
            hint="In Admin → Engine images, append @sha256:<digest> from `docker images "
            "--digests` on a host that has the approved image.",
            obj=image,
            id="berth.W010",
        )
        for image in images
        if not image.digest
    ]
