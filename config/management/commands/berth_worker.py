"""``manage.py berth_worker [QUEUE ...]``: an RQ worker whose jobs run under their audit context.

Unlike django-rq's ``rqworker`` it accepts any queue name (host queues ``host:<name>`` are made
at run time) and always uses :class:`core.queues.ContextJob`.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connections
from redis.exceptions import RedisError
from rq import SimpleWorker, Worker

from core.queues import DEFAULT_QUEUE, ContextJob, get_queue, redis_connection


class Command(BaseCommand):
    help = "Run an RQ worker on the given queues (default: 'default')."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("queues", nargs="*", default=[DEFAULT_QUEUE])
        parser.add_argument("--burst", action="store_true", help="exit once the queues are empty")
        parser.add_argument("--with-scheduler", action="store_true", help="also run RQ's scheduler")
        parser.add_argument("--name", help="worker name (default: RQ's host+pid name)")
        parser.add_argument(
            "--simple",
            action="store_true",
            help="run jobs in this process instead of a forked work horse (debugging only)",
        )

    def handle(
        self,
        *args: Any,
        queues: list[str],
        burst: bool,
        with_scheduler: bool,
        name: str | None,
        simple: bool,
        **options: Any,
    ) -> None:
        worker_class = SimpleWorker if simple else Worker
        connection = redis_connection()
        try:
            connection.ping()
        except RedisError as exc:
            raise CommandError(
                f"Redis is not reachable at REDIS_URL={settings.REDIS_URL}: {exc}"
            ) from None
        worker = worker_class(
            [get_queue(queue) for queue in queues],
            connection=connection,
            job_class=ContextJob,
            name=name,
            # Beat at least every agent interval while a job runs: reconcile takes a started
            # job whose worker went silent for three beats for lost (core.liveness).
            job_monitoring_interval=min(30, settings.BERTH_AGENT_INTERVAL_S),
        )
        # The work horse is forked per job: it must not inherit this process's DB sockets.
        connections.close_all()
        worker.work(burst=burst, with_scheduler=with_scheduler, logging_level=settings.RQ_LOG_LEVEL)
