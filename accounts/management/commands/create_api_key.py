"""``manage.py create_api_key``: make a team's key and print it once.

    manage.py create_api_key --team team-a --name ci --models llama,qwen --expires-days 90 \\
        --scope inference --rpm 600 --tpm 200000 --json
    {"id": "…", "key": "bk_1a2b3c4d_…", "prefix": "1a2b3c4d", "scope": "inference",
     "expires": "2027-03-01T10:00:00+00:00"}

The key is not stored in clear anywhere: keep the output. Audited as ``apikey.created``
(an invalid value is refused naming the option, and audited as ``denied``).
"""

from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.keys import KeySettings, create_api_key
from accounts.models import KeyScope, Team
from audit.actions import ActorKind
from core import context

OPTION_OF_FIELD = {"models": "--models", "expires_days": "--expires-days", "name": "--name"}


class Command(BaseCommand):
    help = "Create an API key for a team and print it once (gateway or JSON API)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--team", required=True, help="team slug")
        parser.add_argument("--name", required=True, help="what the key is for")
        parser.add_argument(
            "--models",
            default="",
            help="served model names, comma-separated (default: every model of the team)",
        )
        parser.add_argument("--expires-days", type=int, default=None)
        parser.add_argument("--scope", choices=KeyScope.values, default=KeyScope.INFERENCE)
        parser.add_argument("--rpm", type=int, default=None, help="requests per minute")
        parser.add_argument("--tpm", type=int, default=None, help="tokens per minute")
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    def handle(self, *args: Any, **options: Any) -> None:
        team = Team.objects.filter(slug=options["team"]).first()
        if team is None:
            raise CommandError(f"--team: no team with the slug {options['team']!r}")
        wanted = KeySettings(
            name=options["name"],
            scope=options["scope"],
            model_names=tuple(m.strip() for m in options["models"].split(",") if m.strip()),
            expires_days=options["expires_days"],
            rpm=options["rpm"],
            tpm=options["tpm"],
        )
        with context.bind(actor_name="manage.py create_api_key", actor_kind=ActorKind.SYSTEM):
            try:
                key, clear = create_api_key(team, wanted)
            except ValidationError as exc:
                raise CommandError(_explain(exc)) from None
        result = {
            "id": str(key.public_id),
            "key": clear,
            "prefix": key.prefix,
            "scope": key.scope,
            "expires": key.expires.isoformat() if key.expires else None,
        }
        if options["json"]:
            self.stdout.write(json.dumps(result))
            return
        self.stdout.write(f"Key for team {team.slug} ({key.name}), shown once — keep it now:")
        self.stdout.write(f"  {clear}")
        self.stdout.write(f"  scope {key.scope}, expires {result['expires'] or 'never'}")


def _explain(exc: ValidationError) -> str:
    return "; ".join(
        f"{OPTION_OF_FIELD.get(field, '--' + field)}: {' '.join(messages)}"
        for field, messages in exc.message_dict.items()
    )
