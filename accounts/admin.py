"""Admin pages for accounts and teams; changes go through the audited services."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.auth.admin import UserAdmin

import audit
from accounts.models import Membership, Team, User
from audit.actions import Action


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 1
    autocomplete_fields = ["user"]


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
    list_display = ["name", "slug", "created"]
    search_fields = ["name", "slug"]
    inlines = [MembershipInline]

    def save_model(self, request: Any, obj: Team, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if not change:
            audit.record(Action.TEAM_CREATED, target=obj, team=obj, slug=obj.slug, name=obj.name)

    def save_formset(self, request: Any, form: Any, formset: Any, change: bool) -> None:
        instances = formset.save(commit=False)
        for removed in formset.deleted_objects:
            audit.record(
                Action.TEAM_MEMBER_REMOVED,
                target=removed.user,
                team=removed.team,
                username=removed.user.username,
            )
            removed.delete()
        for membership in instances:
            is_new = membership.pk is None
            membership.save()
            if is_new:
                audit.record(
                    Action.TEAM_MEMBER_ADDED,
                    target=membership.user,
                    team=membership.team,
                    username=membership.user.username,
                )
        formset.save_m2m()
