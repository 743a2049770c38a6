"""Admin pages for hosts and GPUs: read-mostly. Hosts are registered through the audited
``register_host`` service (``manage.py register_host``); GPU rows are written by agents only."""

from __future__ import annotations

from typing import Any

from django.contrib import admin

import audit
from audit.actions import Action
from core import queues
from core.queues import get_queue
from gpus.models import Gpu, Host


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ["name", "status", "last_heartbeat", "inventory_source", "nvidia_runtime"]
    list_filter = ["status"]
    search_fields = ["name"]
    readonly_fields = [field.name for field in Host._meta.fields]
    actions = ["collect_garbage"]

    def has_add_permission(self, request: Any) -> bool:
        return False  # through manage.py register_host, which audits it

    @admin.action(description="Collect Docker garbage now (builder cache, stopped engines)")
    def collect_garbage(self, request: Any, queryset: Any) -> None:
        for host in queryset:
            # By job name: the deployments app owns garbage collection.
            job_id = queues.enqueue(
                get_queue(host.queue_name), "deployments.runtime.jobs.gc_job", host.pk
            )
            audit.record(Action.GC_REQUESTED, target=host, job_id_queued=job_id)
        self.message_user(request, f"Garbage collection queued on {queryset.count()} host(s).")


@admin.register(Gpu)
class GpuAdmin(admin.ModelAdmin):
    list_display = ["host", "index", "name", "uuid", "present", "seen_at", "memory_foreign_mib"]
    list_filter = ["present", "name"]
    search_fields = ["uuid", "host__name"]
    readonly_fields = [field.name for field in Gpu._meta.fields]

    def has_add_permission(self, request: Any) -> bool:
        return False
