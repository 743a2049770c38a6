"""Admin pages for accounts and teams; changes go through the audited services."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.auth.admin import UserAdmin

import audit
from accounts import services
from accounts.models import Membership, Team, User
from audit.actions import Action


class MembershipInline(admin.TabularInline):
    """Members are added or removed, never re-pointed, so each change is one audited action."""

    model = Membership
    extra = 1
    autocomplete_fields = ["user"]

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(User)
class BerthUserAdmin(UserAdmin):
    list_display = ["username", "email", "role", "is_active", "last_login"]
    list_filter = ["role", "is_active"]
    fieldsets = (
        *UserAdmin.fieldsets[:1],
        ("Role", {"fields": ["role", "is_active"]}),
        *UserAdmin.fieldsets[1:2],
        ("Important dates", {"fields": ["last_login", "date_joined"]}),
    )
    add_fieldsets = (
        (None, {"classes": ["wide"], "fields": ["username", "role", "password1", "password2"]}),
    )
    readonly_fields = ["last_login", "date_joined"]

    def save_model(self, request: Any, obj: User, form: Any, change: bool) -> None:
        old_role = (
            User.objects.filter(pk=obj.pk).values_list("role", flat=True).first()
            if change
            else None
        )
        super().save_model(request, obj, form, change)
        if not change:
            audit.record(Action.ACCOUNT_CREATED, target=obj, username=obj.username, role=obj.role)
        elif old_role != obj.role:
            audit.record(Action.ACCOUNT_ROLE_CHANGED, target=obj, old=old_role, new=obj.role)


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    search_fields = ["name", "slug"]
    inlines = [MembershipInline]

    list_display = ["name", "slug", "gpu_quota", "host_memory_quota_gib", "created"]

    def save_model(self, request: Any, obj: Team, form: Any, change: bool) -> None:
        old_quota, old_memory = (
            Team.objects.filter(pk=obj.pk).values_list("gpu_quota", "host_memory_quota_gib").first()
            if change
            else None
        ) or (None, None)
        super().save_model(request, obj, form, change)
        if not change:
            audit.record(Action.TEAM_CREATED, target=obj, team=obj, slug=obj.slug, name=obj.name)
        elif old_quota != obj.gpu_quota:
            audit.record(
                Action.TEAM_QUOTA_CHANGED, target=obj, team=obj, old=old_quota, new=obj.gpu_quota
            )
        if change and old_memory != obj.host_memory_quota_gib:
            audit.record(
                Action.TEAM_MEMORY_QUOTA_CHANGED,
                target=obj,
                team=obj,
                old=old_memory,
                new=obj.host_memory_quota_gib,
            )

    def save_formset(self, request: Any, form: Any, formset: Any, change: bool) -> None:
        """Membership changes go through the audited services."""
        added = formset.save(commit=False)
        for membership in formset.deleted_objects:
            services.remove_member(membership.team, membership.user)
        for membership in added:
            services.add_member(membership.team, membership.user)
