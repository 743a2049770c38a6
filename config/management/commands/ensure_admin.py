"""``manage.py ensure_admin``: create the first admin account once; print a generated login once.

The username comes from BERTH_ADMIN_USERNAME (default ``admin``) and the password from
BERTH_ADMIN_PASSWORD or BERTH_ADMIN_PASSWORD_FILE; without one a password is generated, printed
once and never stored in clear.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from accounts.services import ensure_first_admin
from config.env import env_secret, env_str


class Command(BaseCommand):
    help = "Create the first admin account if there is none."

    def handle(self, *args: Any, **options: Any) -> None:
        username = env_str("BERTH_ADMIN_USERNAME", "admin")
        password = env_secret("BERTH_ADMIN_PASSWORD")
        result = ensure_first_admin(username, password)
        if not result.created:
            self.stdout.write(f"Admin account exists ({result.username}).")
            return
        self.stdout.write(self.style.SUCCESS("Created the first admin account."))
        self.stdout.write(f"  username: {result.username}")
        if result.password is not None:
            self.stdout.write(f"  password: {result.password}")
            self.stdout.write(
                "  (shown once: note it now, or change it with manage.py changepassword)"
            )
        else:
            self.stdout.write("  password: from BERTH_ADMIN_PASSWORD")
