from __future__ import annotations

from django.apps import AppConfig


class GpusConfig(AppConfig):
    """Hosts, GPUs, inventory snapshots, collectors and GPU selection."""

    name = "gpus"
    verbose_name = "GPU inventory"
