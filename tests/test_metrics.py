"""``/metrics`` for Prometheus: who may scrape it, and the figures read from the database and
RQ's registries at scrape time (real Redis, real RQ worker)."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue, SimpleWorker

from accounts.models import Team, User
from core.queues import redis_connection
from deployments.models import Deployment
from deployments.states import State
from gateway.usage import UsageRecord, apply
from gpus.models import Gpu, HostStatus
from tests.conftest import run_manage, subprocess_env
from tests.deployment_builders import deployment, host_with_gpus, registered_model
from tests.model_dirs import write_model

pytestmark = pytest.mark.django_db
TOKEN = "metrics-token-for-tests-0123456789"
MIB = 1024 * 1024


def succeed(seconds: float = 0.0) -> str:
    """A job for the worker below."""
    return f"done after {seconds} s"


def fail() -> None:
    """A job that fails."""
    raise RuntimeError("this job fails on purpose")


def scrape(client: Client, **extra: str) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", **extra)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_who_may_scrape(people: dict[str, User | None], settings: Any) -> None:
    settings.BERTH_METRICS_TOKEN = TOKEN
    statuses = {}
    for name, person in people.items():
        client = Client()
        if person is not None:
            client.force_login(person)
        statuses[name] = client.get("/metrics").status_code
    assert statuses == {"alice": 403, "bob": 403, "carol": 403, "admin": 200, "anonymous": 401}
    anonymous = Client()
    assert anonymous.get("/metrics")["WWW-Authenticate"].startswith("Bearer")
    bearer = anonymous.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert bearer.status_code == 200
    for wrong in (f"Bearer {TOKEN}x", f"Basic {TOKEN}", "Bearer "):
        assert anonymous.get("/metrics", headers={"Authorization": wrong}).status_code == 403
    assert anonymous.post("/metrics").status_code == 405


def test_no_token_configured_means_admins_only(admin: User, settings: Any) -> None:
    settings.BERTH_METRICS_TOKEN = ""
    assert Client().get("/metrics", headers={"Authorization": "Bearer "}).status_code == 403
    client = Client()
    client.force_login(admin)
    assert client.get("/metrics").status_code == 200


def test_deployments_by_state_gpu_memory_by_owner_and_inventory_age(
    team_a: Team, tmp_path: Path, settings: Any
) -> None:
    settings.BERTH_METRICS_TOKEN = TOKEN
    write_model(tmp_path / "team-a" / "tiny")
    model = registered_model(team_a, tmp_path, "tiny")
    host = host_with_gpus(count=2, memory_mib=81_559)
    deployment(team_a, model, host, name="one")
    Deployment.objects.filter(pk=deployment(team_a, model, host, name="two").pk).update(
        state=State.READY
    )
    collected = timezone.now() - timedelta(seconds=30)
    Gpu.objects.filter(index=0).update(
        memory_berth_mib=40_000, memory_foreign_mib=2_000, memory_free_mib=39_559, seen_at=collected
    )
    host.__class__.objects.filter(pk=host.pk).update(
        status=HostStatus.ONLINE, last_collected=collected, last_heartbeat=collected
    )

    samples = scrape(Client(), HTTP_AUTHORIZATION=f"Bearer {TOKEN}")

    assert samples[("berth_deployments", (("state", "pending"),))] == 1
    assert samples[("berth_deployments", (("state", "ready"),))] == 1
    assert samples[("berth_deployments", (("state", "failed"),))] == 0
    for owner, mib in (("deployment", 40_000), ("foreign", 2_000), ("free", 39_559)):
        assert samples[("berth_gpu_memory_bytes", gpu_labels(0, owner=owner))] == mib * MIB
    # GPU 1 was never read: its size is known, its use is not (no made-up zeros).
    assert samples[("berth_gpu_memory_total_bytes", gpu_labels(1))] == 81_559 * MIB
    assert ("berth_gpu_memory_bytes", gpu_labels(1, owner="free")) not in samples
    assert 29 <= samples[("berth_host_inventory_age_seconds", (("host", "gpu-01"),))] < 120
    assert samples[("berth_host_placeable", (("host", "gpu-01"), ("status", "online")))] == 1


def gpu_labels(index: int, **extra: str) -> tuple:
    labels = {"host": "gpu-01", "gpu": str(index), "uuid": f"GPU-gpu-01-{index}", **extra}
    return tuple(sorted(labels.items()))


@pytest.mark.redis
def test_job_counts_and_durations_come_from_rqs_registries(admin: User) -> None:
    # RQ's plain job class: Berth's ContextJob closes the database connections around a job,
    # which would close this test's own connection (the worker runs in this process).
    queue = Queue("default", connection=redis_connection())
    queue.enqueue(succeed, 0.0)
    queue.enqueue(succeed, 0.0)
    queue.enqueue(fail)
    SimpleWorker([queue], connection=redis_connection()).work(burst=True)
    queue.enqueue(succeed, 0.0)  # still waiting: no worker runs now
    client = Client()
    client.force_login(admin)

    samples = scrape(client)

    def jobs(state: str) -> float:
        return samples[("berth_rq_jobs", (("queue", "default"), ("state", state)))]

    assert (jobs("queued"), jobs("finished"), jobs("failed"), jobs("started")) == (1, 2, 1, 0)
    median = samples[
        (
            "berth_rq_job_duration_seconds",
            (("function", "tests.test_metrics.succeed"), ("quantile", "0.5"), ("queue", "default")),
        )
    ]
    assert 0 <= median < 5
    assert samples[("berth_redis_up", ())] == 1


def test_a_scrape_still_answers_when_redis_is_down(admin: User, settings: Any) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    redis_connection.cache_clear()
    client = Client()
    client.force_login(admin)
    try:
        samples = scrape(client)
    finally:
        redis_connection.cache_clear()
    assert samples[("berth_redis_up", ())] == 0
    assert ("berth_deployments", (("state", "ready"),)) in samples


def test_a_short_metrics_token_stops_start_up_with_the_fix() -> None:
    result = run_manage("check", env=subprocess_env(BERTH_METRICS_TOKEN="short"))
    assert result.returncode != 0
    assert "BERTH_METRICS_TOKEN is shorter than 24 characters" in result.stderr


def test_the_months_gateway_usage_by_team_and_model(
    admin: User, team_a: Team, settings: Any
) -> None:
    now = time.time()
    last_month = now - 40 * 86400
    records = [
        UsageRecord(now, team_a.pk, "1a2b3c4d", "llama", 7, 0, status, 10, 5, 30.0, None)
        for status in (200, 200, 502)
    ]
    apply(
        [
            *records,
            UsageRecord(last_month, team_a.pk, "1a2b3c4d", "llama", 7, 0, 200, 99, 99, 30.0, None),
        ]
    )
    client = Client()
    client.force_login(admin)
    text = client.get("/metrics").content.decode()
    assert 'berth_gateway_month_requests{model="llama",outcome="ok",team="team-a"} 2.0' in text
    assert 'berth_gateway_month_requests{model="llama",outcome="error",team="team-a"} 1.0' in text
    assert 'berth_gateway_month_tokens{kind="completion",model="llama",team="team-a"} 15.0' in text
