"""``manage.py revoke_api_key PREFIX``: revoke a key by its prefix (``bk_<prefix>_…``);
every gateway refuses it within a second. Audited as ``apikey.revoked``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.keys import revoke_api_key
from accounts.models import ApiKey
from audit.actions import ActorKind
from core import context


class Command(BaseCommand):
    help = "Revoke an API key by its prefix."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("prefix", help="the 8 hex digits after bk_ (or the whole bk_… key)")

    def handle(self, *args: Any, prefix: str, **options: Any) -> None:
        wanted = prefix.removeprefix("bk_").split("_", 1)[0]
        key = ApiKey.objects.select_related("team").filter(prefix=wanted).first()
        if key is None:
            raise CommandError(f"prefix: no key bk_{wanted}_…")
        with context.bind(actor_name="manage.py revoke_api_key", actor_kind=ActorKind.SYSTEM):
            changed = revoke_api_key(key, reason="manage.py revoke_api_key")
        self.stdout.write(f"bk_{wanted}_… " + ("revoked" if changed else "was already revoked"))
