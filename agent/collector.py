"""The host agent: periodic inventory and heartbeat beside an RQ worker on ``host:<name>``.

``manage.py berth_agent --host gpu-01`` runs :class:`CollectorLoop` in a thread and the worker
in the main thread (RQ installs its signal handlers there); ``--once`` runs
:func:`gpus.rounds.collect_round` and exits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from django.db import close_old_connections, connection
from redis.exceptions import RedisError

from agent.scheduler import PeriodicJobs
from gpus.inventory import heartbeat
from gpus.models import Host
from gpus.readings import Collection, Source
from gpus.rounds import collect_round

log = logging.getLogger(__name__)


class CollectorLoop(threading.Thread):
    """Collect every ``interval_s`` (and beat the heart on a thread of its own) until
    :meth:`stop`; after each round, enqueue the registered periodic jobs that are due
    (``core.periodic``). A failing round is logged, never fatal."""

    def __init__(
        self,
        host: Host,
        *,
        interval_s: float,
        sources: tuple[str, ...] = Source.ORDER,
        worker_heartbeat: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(name=f"berth-collector-{host.name}", daemon=True)
        self.host = host
        self.interval_s = interval_s
        self.sources = sources
        self.rounds = 0
        self._stopping = threading.Event()
        self.periodic = PeriodicJobs(host)
        self.worker_heartbeat = worker_heartbeat
        self._last_problem = ""

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        # Heartbeats run on their own thread: a collection stuck on a slow source (an image
        # pull, a hung nvidia-smi) leaves stale readings, which placement refuses, but does
        # not make a live agent look dead.
        beats = threading.Thread(target=self._beat, name=f"{self.name}-heartbeat", daemon=True)
        beats.start()
        try:
            while not self._stopping.is_set():
                started = time.monotonic()
                self._round()
                self._stopping.wait(max(self.interval_s - (time.monotonic() - started), 0))
        finally:
            connection.close()
            beats.join(timeout=self.interval_s + 5)

    def _beat(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    close_old_connections()
                    heartbeat(self.host)
                except Exception:
                    log.exception("heartbeat failed on %s", self.host.name)
                if self.worker_heartbeat is not None:
                    try:
                        self.worker_heartbeat()
                    except RedisError:
                        log.warning("worker heartbeat failed on %s: Redis", self.host.name)
                self._stopping.wait(self.interval_s)
        finally:
            connection.close()

    def _round(self) -> None:
        close_old_connections()
        try:
            collection = collect_round(self.host, sources=self.sources)
            self._log_outcome(collection)
            self.periodic.tick()
        except Exception:
            log.exception("collection round failed on %s", self.host.name)
        self.rounds += 1

    def _log_outcome(self, collection: Collection) -> None:
        """Warn when the inventory becomes unavailable or its reason changes, and once when it
        recovers — not every round: a laptop without a GPU would log it every few seconds.
        The host page and /metrics show the state all along."""
        problem = (
            ""
            if collection.ok
            else "; ".join(f"{f.source}: {f.error}" for f in collection.failures)
        )
        if problem and problem != self._last_problem:
            log.warning("inventory unavailable on %s: %s", self.host.name, problem)
        elif not problem and self._last_problem:
            log.warning("inventory available again on %s", self.host.name)
        self._last_problem = problem
