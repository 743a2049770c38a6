"""``manage.py berth_agent --host NAME`` as a real process: its collector writes heartbeats and
inventory state, its worker runs jobs from ``host:NAME``, and SIGTERM stops both."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
from redis import Redis
from rq import Queue
from rq.job import JobStatus

from agent.collector import CollectorLoop
from core.queues import DEFAULT_QUEUE, get_queue
from deployments.runtime.jobs import gc_job, reconcile_job
from gpus.hosts import register_host
from gpus.jobs import compact_host_history
from gpus.models import Host, HostStatus
from gpus.readings import Collection, Inventory, Source, SourceFailure
from tests.conftest import BASE_DIR, subprocess_env

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]

DEADLINE_S = 45


def wait_for(predicate: Callable[[], bool], deadline_s: float = DEADLINE_S) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_agent_collects_heartbeats_serves_its_queue_and_books_periodic_jobs(
    redis_client: Redis, periodic_claims: Redis
) -> None:
    host = register_host("gpu-agent")[0]
    agent = subprocess.Popen(
        [
            sys.executable,
            str(BASE_DIR / "manage.py"),
            "berth_agent",
            "--host",
            "gpu-agent",
            "--sources",
            "nvml",
            "--interval",
            "0.5",
        ],
        env=subprocess_env(),
        cwd=BASE_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # No NVIDIA driver here: the collector marks the host unavailable, with NVML's error.
        assert wait_for(
            lambda: Host.objects.get(pk=host.pk).status == HostStatus.INVENTORY_UNAVAILABLE
        )
        first = Host.objects.get(pk=host.pk).last_heartbeat
        assert wait_for(lambda: Host.objects.get(pk=host.pk).last_heartbeat > first)
        assert "NVMLError_LibraryNotFound" in Host.objects.get().inventory_errors[0]["error"]
        job = Queue(host.queue_name, connection=redis_client).enqueue(compact_host_history, host.pk)
        assert wait_for(lambda: job.get_status(refresh=True) == JobStatus.FINISHED)
        assert job.return_value() == {"rolled_up": 0, "rollups": 0, "expired": 0}
        # The console's periodic jobs, claimed by this (the only) agent, wait on the default queue
        # (the chain's verification a minute after the start).
        default = Queue("default", connection=redis_client)
        assert wait_for(lambda: "sync_due_mounts" in _names(default))
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=DEADLINE_S)
        output = agent.stdout.read()
        agent.stdout.close()
    Queue("default", connection=redis_client).empty()
    assert code == 0, output
    assert "Berth agent for gpu-agent stopped." in output


def _names(queue: Queue) -> set[str]:
    return {job.func_name.rsplit(".", 1)[-1] for job in queue.jobs}


def test_heartbeats_continue_while_a_collection_hangs() -> None:
    """A slow source leaves readings stale (placement refuses them) but the agent alive."""
    host = register_host("gpu-slow")[0]
    release = threading.Event()
    with mock.patch(
        "agent.collector.collect_round", autospec=True, side_effect=lambda *a, **k: release.wait(30)
    ):
        loop = CollectorLoop(host, interval_s=0.1)
        loop.start()
        try:
            assert wait_for(lambda: Host.objects.get(pk=host.pk).last_heartbeat is not None)
            first = Host.objects.get(pk=host.pk).last_heartbeat
            assert wait_for(lambda: Host.objects.get(pk=host.pk).last_heartbeat > first)
            assert loop.rounds == 0  # the first collection is still hanging
        finally:
            loop.stop()
            release.set()
            loop.join(timeout=10)
    assert not loop.is_alive()


@pytest.mark.django_db
def test_each_round_reconciles_on_its_own_interval_and_a_lasting_failure_is_logged_once(
    settings: Any, caplog: pytest.LogCaptureFixture, periodic_claims: Redis
) -> None:
    settings.BERTH_RECONCILE_INTERVAL_S = 60
    settings.BERTH_GC_INTERVAL_H = 1
    host = register_host("gpu-rounds")[0]
    failed = Collection(None, (SourceFailure(Source.NVML, "NVMLError_LibraryNotFound"),))
    loop = CollectorLoop(host, interval_s=60)
    queues = [get_queue(host.queue_name), get_queue(DEFAULT_QUEUE)]
    for queue in queues:
        queue.empty()
    clock = [0.0]  # one reconcile interval passes between rounds
    loop.periodic.clock = lambda: clock[0]
    with (
        mock.patch("agent.collector.collect_round", autospec=True, return_value=failed) as rounds,
        caplog.at_level(logging.WARNING, logger="agent.collector"),
    ):
        for _ in range(3):
            loop._round()
            clock[0] += 60
        rounds.return_value = Collection(Inventory(Source.NVML, ()))
        loop._round()
    # What the ticks put on the host's queue (the console's jobs go to the default queue).
    jobs = [job.func for queue in queues for job in queue.jobs]
    for queue in queues:
        queue.empty()
    assert jobs.count(reconcile_job) == 4  # not only with the hourly compaction
    assert jobs.count(compact_host_history) == 1
    assert jobs.count(gc_job) == 0  # first due one GC interval after the agent started
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "inventory unavailable on gpu-rounds: nvml: NVMLError_LibraryNotFound",
        "inventory available again on gpu-rounds",
    ]
