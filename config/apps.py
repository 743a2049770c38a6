from __future__ import annotations

from django.apps import AppConfig


class ConfigConfig(AppConfig):
    """The project itself as an app: its management commands (`berth_up`, `berth_worker`,
    `ensure_admin`), the dashboard and the system checks that guard production settings."""

    name = "config"
    verbose_name = "Berth"

    def ready(self) -> None:
        from config import checks  # noqa: F401  (registers the system checks)
