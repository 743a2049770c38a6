"""``manage.py berth_gateway``: serve the OpenAI-compatible gateway until SIGTERM or Ctrl-C.

Listens on ``BERTH_GATEWAY_BIND``:``BERTH_GATEWAY_PORT`` (8001) under uvicorn with uvloop and
httptools. ``--workers N`` runs N processes on the one port (the kernel spreads connections);
limits and budgets hold across them, since their counters are in Redis.
"""

from __future__ import annotations

from typing import Any

import uvicorn
from django.conf import settings
from django.core.management.base import BaseCommand

from gateway.app import create_app

# Clients such as the OpenAI SDK keep connections open between requests; a longer keep-alive
# than uvicorn's 5 s default spares them a new TCP handshake after each pause.
CLIENT_KEEPALIVE_S = 75
BACKLOG = 2048


class Command(BaseCommand):
    help = "Serve the OpenAI-compatible gateway (/v1/chat/completions, ...) on its own port."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--bind", default=settings.BERTH_GATEWAY_BIND,
                            help="address to listen on (BERTH_GATEWAY_BIND)")  # fmt: skip
        parser.add_argument("--port", type=int, default=settings.BERTH_GATEWAY_PORT,
                            help="port to listen on (BERTH_GATEWAY_PORT)")  # fmt: skip
        parser.add_argument("--workers", type=int, default=1,
                            help="processes serving the port (default 1)")  # fmt: skip

    def handle(self, *args: Any, bind: str, port: int, workers: int, **options: Any) -> None:
        common = {
            "host": bind,
            "port": port,
            "loop": "uvloop",
            "http": "httptools",
            "lifespan": "on",
            "access_log": False,
            "server_header": False,
            "log_config": None,  # keep Berth's logging (request ids, JSON format)
            "timeout_keep_alive": CLIENT_KEEPALIVE_S,
            "backlog": BACKLOG,
        }
        if workers > 1:
            uvicorn.run("gateway.asgi:create_app", factory=True, workers=workers, **common)
        else:
            uvicorn.run(create_app(), **common)
