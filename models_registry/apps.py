from __future__ import annotations

from django.apps import AppConfig


class ModelsRegistryConfig(AppConfig):
    """Storage mounts, registered model directories, their inspection and filesystem sync."""

    name = "models_registry"
    verbose_name = "Model registry"
