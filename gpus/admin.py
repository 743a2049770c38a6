"""Admin pages for hosts and GPUs: read-mostly. Hosts are registered through the audited
``register_host`` service (``manage.py register_host``); GPU rows are written by agents only."""

from __future__ import annotations

from typing import Any

from django.contrib import admin

from gpus.models import Gpu, Host


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ["name", "status", "last_heartbeat", "inventory_source", "nvidia_runtime"]
    list_filter = ["status"]
    search_fields = ["name"]
    readonly_fields = [field.name for field in Host._meta.fields]

    def has_add_permission(self, request: Any) -> bool:
        return False  # through manage.py register_host, which audits it


@admin.register(Gpu)
class GpuAdmin(admin.ModelAdmin):
    list_display = ["host", "index", "name", "uuid", "present", "seen_at", "memory_foreign_mib"]
    list_filter = ["present", "name"]
    search_fields = ["uuid", "host__name"]
    readonly_fields = [field.name for field in Gpu._meta.fields]

    def has_add_permission(self, request: Any) -> bool:
        return False
