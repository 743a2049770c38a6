from __future__ import annotations

from django.apps import AppConfig


class DeploymentsConfig(AppConfig):
    """Deployments, the planner, the launcher, monitoring, diagnosis and garbage collection."""

    name = "deployments"
    verbose_name = "Deployments"

    def ready(self) -> None:
        from deployments import checks  # noqa: F401  (registers the system checks)
        from deployments.runtime import jobs  # noqa: F401  (registers reconcile and GC)
        from deployments.scaling import jobs as scaling_jobs  # noqa: F401  (the scaler)
