"""``manage.py sync_models MOUNT``: discover, register and refresh the models under a mount."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from models_registry.models import StorageMount
from models_registry.sync import SyncError, sync_mount


class Command(BaseCommand):
    help = "Sync a storage mount: register new models, refresh changed ones, mark vanished missing."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("mount", help="the storage mount's name")

    def handle(self, *args: Any, mount: str, **options: Any) -> None:
        try:
            storage = StorageMount.objects.get(name=mount)
        except StorageMount.DoesNotExist:
            names = (
                ", ".join(StorageMount.objects.values_list("name", flat=True)) or "none registered"
            )
            raise CommandError(f"no storage mount named {mount!r} (known: {names})") from None
        try:
            result = sync_mount(storage)
        except SyncError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"{storage.name}: {result.created} registered, {result.updated} refreshed, "
            f"{result.unchanged} unchanged, {result.missing} marked missing, "
            f"{len(result.unowned)} outside any team folder ({result.seconds:.2f} s)"
        )
        for path in result.unowned[:20]:
            self.stdout.write(f"  not registered (no owning team): {path}")
