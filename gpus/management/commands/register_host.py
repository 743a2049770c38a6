"""``manage.py register_host NAME [--docker-endpoint URL] [--label KEY=VALUE ...]``.

For admins setting up a GPU server: creates (or updates) the host row, audited, and prints the
agent command to run on that server.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from gpus.hosts import register_host


class Command(BaseCommand):
    help = "Register a GPU host (or update its Docker endpoint and labels)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("name", help="host name; its agent's queue is host:<name>")
        parser.add_argument(
            "--docker-endpoint",
            default="",
            help="Docker API address as the agent reaches it (default: DOCKER_HOST / local)",
        )
        parser.add_argument(
            "--label",
            action="append",
            default=None,
            metavar="KEY=VALUE",
            help="a label for placement rules (repeatable; replaces all labels when given)",
        )

    def handle(
        self,
        *args: Any,
        name: str,
        docker_endpoint: str,
        label: list[str] | None,
        **options: Any,
    ) -> None:
        labels = _labels(label) if label is not None else None
        try:
            host, created = register_host(name, docker_endpoint=docker_endpoint, labels=labels)
        except ValidationError as exc:
            raise CommandError(f"{name!r}: {' '.join(exc.messages)}") from None
        verb = "Registered" if created else "Host exists:"
        self.stdout.write(self.style.SUCCESS(f"{verb} {host.name} (queue {host.queue_name})."))
        self.stdout.write(f"  Run on that server: python manage.py berth_agent --host {host.name}")


def _labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"--label {item!r}: write KEY=VALUE")
        labels[key.strip()] = value.strip()
    return labels
