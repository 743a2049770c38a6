"""The audit trail in the Django admin: read-only, for admins."""

from __future__ import annotations

from typing import Any

from django.contrib import admin

from audit.models import AuditEvent


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = [
        "seq",
        "time",
        "actor_name",
        "action",
        "outcome",
        "team_slug",
        "target_repr",
        "request_id",
    ]
    list_filter = ["outcome", "action", "actor_kind"]
    search_fields = ["actor_name", "target_repr", "request_id", "job_id"]
    show_full_result_count = False
    list_select_related = False

    def get_readonly_fields(self, request: Any, obj: AuditEvent | None = None) -> list[str]:
        return [field.name for field in AuditEvent._meta.fields]

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: AuditEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: AuditEvent | None = None) -> bool:
        return False
