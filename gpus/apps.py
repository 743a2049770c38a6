from __future__ import annotations

from django.apps import AppConfig


class GpusConfig(AppConfig):
    """Hosts, GPUs, inventory snapshots, collectors and GPU selection."""

    name = "gpus"
    verbose_name = "GPU inventory"

    def ready(self) -> None:
        from gpus import jobs  # noqa: F401  (registers the hourly history compaction)
