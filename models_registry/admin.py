"""Admin pages: storage mounts are managed here; models are registered through the console."""

from __future__ import annotations

from typing import Any

from django.contrib import admin

import audit
from audit.actions import Action
from models_registry.models import Model, StorageMount


@admin.register(StorageMount)
class StorageMountAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "canonical_prefix",
        "local_path",
        "host_path",
        "container_path",
        "kind",
        "team",
        "last_synced",
    ]
    readonly_fields = ["last_synced", "created"]

    def save_model(self, request: Any, obj: StorageMount, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        audit.record(
            Action.STORAGE_MOUNT_SAVED,
            target=obj,
            team=obj.team,
            created=not change,
            **{
                field: getattr(obj, field)
                for field in ("canonical_prefix", "local_path", "host_path", "container_path")
            },
            sync_interval_minutes=obj.sync_interval_minutes,
            kind=obj.kind,
        )


@admin.register(Model)
class ModelAdmin(admin.ModelAdmin):
    """Read-only: registering and re-inspecting go through the console's audited pages."""

    list_display = [
        "path",
        "team",
        "status",
        "architecture",
        "parameter_count",
        "remote_code_approved",
        "inspected_at",
    ]
    list_filter = ["status", "team", "mount", "remote_code_approved"]
    search_fields = ["path", "architecture"]
    actions = ["approve_remote_code", "revoke_remote_code"]

    @admin.action(description="Approve remote code (--trust-remote-code) after reviewing it")
    def approve_remote_code(self, request: Any, queryset: Any) -> None:
        self._set_remote_code(request, queryset, approved=True)

    @admin.action(description="Revoke remote-code approval")
    def revoke_remote_code(self, request: Any, queryset: Any) -> None:
        self._set_remote_code(request, queryset, approved=False)

    def _set_remote_code(self, request: Any, queryset: Any, *, approved: bool) -> None:
        for model in queryset:
            Model.objects.filter(pk=model.pk).update(remote_code_approved=approved)
            audit.record(
                Action.MODEL_REMOTE_CODE_APPROVED if approved else Action.MODEL_REMOTE_CODE_REVOKED,
                target=model,
                path=model.path,
            )
        self.message_user(
            request,
            f"{'Approved' if approved else 'Revoked'} remote code for {queryset.count()} model(s).",
        )

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Model | None = None) -> bool:
        return False
