"""``manage.py berth_agent --host NAME [--once]``: the Berth agent of one GPU host.

Runs an RQ worker on ``host:NAME`` (with RQ's scheduler) and, beside it, the inventory
collector: a heartbeat and a collection every BERTH_AGENT_INTERVAL_S seconds. ``--once``
collects, stores, prints what it found and exits (1 when no source could read the GPUs).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connections
from redis.exceptions import RedisError

from agent.collector import CollectorLoop, collect_round
from agent.scheduled import ScheduledJobsLoop
from agent.worker import AgentWorker, work_until_stopped
from core.queues import redis_connection
from gpus.models import Host
from gpus.readings import Source


class Command(BaseCommand):
    help = "Run the agent of one GPU host: RQ worker on host:NAME plus inventory collection."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--host", required=True, help="the registered host's name")
        parser.add_argument("--once", action="store_true", help="collect once and exit")
        parser.add_argument(
            "--interval",
            type=float,
            default=None,
            help="seconds between collections (default BERTH_AGENT_INTERVAL_S)",
        )
        parser.add_argument(
            "--sources",
            default=",".join(Source.ORDER),
            help=f"sources to try, in order (default {','.join(Source.ORDER)})",
        )

    def handle(
        self,
        *args: Any,
        host: str,
        once: bool,
        interval: float | None,
        sources: str,
        **options: Any,
    ) -> None:
        if settings.BERTH_AUDIT_ANCHOR_KEY:
            # Agents write audit events with the database's credentials; the anchors that let
            # the console detect a rewritten chain are only worth something if no agent can
            # sign one (audit/anchors.py).
            raise CommandError(
                "BERTH_AUDIT_ANCHOR_KEY is set: a host agent must not hold the audit anchor "
                "key. Remove BERTH_AUDIT_ANCHOR_KEY (and _FILE) from this agent's environment; "
                "only the console's web and default worker need it"
            )
        row = Host.objects.filter(name=host).first()
        if row is None:
            raise CommandError(
                f"no host named {host!r}; an admin registers it with manage.py register_host {host}"
            )
        chosen = _sources(sources)
        if once:
            self._once(row, chosen)
            return
        self._serve(row, chosen, interval or settings.BERTH_AGENT_INTERVAL_S)

    def _once(self, host: Host, sources: tuple[str, ...]) -> None:
        collection = collect_round(host, sources=sources)
        for failure in collection.failures:
            self.stdout.write(f"  {failure.source}: {failure.error}")
        if collection.inventory is None:
            raise CommandError(f"inventory unavailable on {host.name}: every source failed")
        self.stdout.write(
            self.style.SUCCESS(
                f"{host.name}: {len(collection.inventory.gpus)} GPU(s) from "
                f"{collection.inventory.source}"
            )
        )
        for gpu in collection.inventory.gpus:
            self.stdout.write(
                f"  GPU {gpu.index} {gpu.name} {gpu.uuid}: "
                f"{gpu.memory_used_mib} / {gpu.memory_total_mib} MiB used"
            )

    def _serve(self, host: Host, sources: tuple[str, ...], interval_s: float) -> None:
        connection = redis_connection()
        try:
            connection.ping()
        except RedisError as exc:
            raise CommandError(
                f"Redis is not reachable at REDIS_URL={settings.REDIS_URL}: {exc}"
            ) from None
        # Jobs run in this process (agent.worker), not in a forked work horse: the collector and
        # heartbeat threads are running, and fork() in a threaded process can copy a lock some
        # thread holds (logging, a connection pool) and hang the child forever. Host jobs are
        # short (launch, watch, stop, reconcile, GC); job timeouts still apply. For the same
        # reason scheduled jobs are moved by a thread (agent.scheduled), not RQ's forked
        # scheduler, which also stayed dead for up to ten minutes after a Redis restart.
        loop = CollectorLoop(host, interval_s=interval_s, sources=sources)
        scheduled = ScheduledJobsLoop(host.queue_name)
        self.stdout.write(
            f"Berth agent for {host.name}: worker on {host.queue_name}, "
            f"collecting every {interval_s:g} s"
        )
        self.stdout.flush()
        loop.start()
        scheduled.start()
        connections.close_all()

        def on_worker(worker: AgentWorker) -> None:
            # The heartbeat thread beats for the worker while a job runs in the main thread.
            loop.worker_heartbeat = worker.beat

        try:
            work_until_stopped(host.queue_name, on_worker)
        finally:
            scheduled.stop()
            loop.stop()
            scheduled.join(timeout=5)
            loop.join(timeout=settings.BERTH_GPU_PROBE_TIMEOUT_S)
        self.stdout.write(f"Berth agent for {host.name} stopped.")


def _sources(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [source for source in chosen if source not in Source.ORDER]
    if unknown or not chosen:
        raise CommandError(
            f"--sources: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(Source.ORDER)}"
        )
    return chosen
