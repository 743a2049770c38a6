"""Admin pages: the engine image allow-list is managed here (audited); deployments are read-only
(they change through the console's audited actions). The GPU host admin gains the garbage
collection action here: the deployments app owns the containers it removes."""

from __future__ import annotations

from typing import Any

from django.contrib import admin

import audit
from audit.actions import Action
from core.queues import enqueue, get_queue
from deployments.models import Deployment, DeploymentEvent, EngineImage
from deployments.runtime.jobs import gc_job
from gpus.admin import HostAdmin as InventoryHostAdmin
from gpus.models import Host


@admin.register(EngineImage)
class EngineImageAdmin(admin.ModelAdmin):
    list_display = ["name", "reference", "gpu_capable", "cpu_capable", "is_stand_in", "enabled"]
    list_filter = ["enabled", "gpu_capable", "cpu_capable", "is_stand_in"]

    def save_model(self, request: Any, obj: EngineImage, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        audit.record(
            Action.ENGINE_IMAGE_SAVED,
            target=obj,
            created=not change,
            reference=obj.reference,
            enabled=obj.enabled,
            gpu_capable=obj.gpu_capable,
            cpu_capable=obj.cpu_capable,
            environment=sorted(obj.environment or {}),
        )


class DeploymentEventInline(admin.TabularInline):
    model = DeploymentEvent
    fields = ["time", "generation", "kind", "state", "message"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    list_display = ["name", "team", "state", "host", "gpu_count", "generation", "updated"]
    list_filter = ["state", "team", "host"]
    search_fields = ["name", "container_id"]
    inlines = [DeploymentEventInline]

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Deployment | None = None) -> bool:
        return False


admin.site.unregister(Host)


@admin.register(Host)
class HostAdmin(InventoryHostAdmin):
    actions = ["collect_garbage"]

    @admin.action(description="Collect Docker garbage now (builder cache, stopped engines)")
    def collect_garbage(self, request: Any, queryset: Any) -> None:
        for host in queryset:
            job_id = enqueue(get_queue(host.queue_name), gc_job, host.pk)
            audit.record(Action.GC_REQUESTED, target=host, job_id_queued=job_id)
        self.message_user(request, f"Garbage collection queued on {queryset.count()} host(s).")
