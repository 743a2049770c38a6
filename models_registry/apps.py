from __future__ import annotations

from django.apps import AppConfig


class ModelsRegistryConfig(AppConfig):
    """Storage mounts, registered model directories, their inspection and filesystem sync."""

    name = "models_registry"
    verbose_name = "Model registry"

    def ready(self) -> None:
        from models_registry import jobs  # noqa: F401  (registers the periodic mount syncs)
