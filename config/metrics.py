"""``/metrics`` for Prometheus: read from the database and Redis at scrape time, no global state.

Every figure comes from what every process already writes (rows, RQ's registries in Redis), so
any number of web, worker and agent processes report the same thing and a restart loses
nothing. Prometheus sends ``Authorization: Bearer <BERTH_METRICS_TOKEN>``; an admin's browser
session works too::

    scrape_configs:
      - job_name: berth
        authorization: {credentials_file: /etc/prometheus/berth-token}
        static_configs: [{targets: ["berth.example.com"]}]
"""

from __future__ import annotations

import hmac
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.db.models import Max, Sum
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from rq.job import Job

from core.queues import DEFAULT_QUEUE, get_queue, redis_connection
from deployments.models import Deployment
from deployments.scaling.metrics import scaling_metrics
from deployments.states import State
from deployments.web import groups
from gateway.models import UsageMinute
from gpus.models import Gpu, Host

MIB = 1024 * 1024
# Durations are summarised over the most recently finished jobs (RQ keeps a finished job for its
# result TTL, 500 s by default): about this many in all, split across the queues, at least
# MIN_DURATION_SAMPLE per queue, enough for a stable median while a scrape stays fast.
DURATION_SAMPLE = 2000
MIN_DURATION_SAMPLE = 20
QUANTILES = (0.5, 0.9, 0.99)
JOB_STATES = ("queued", "started", "scheduled", "deferred", "finished", "failed")


class BerthCollector(Collector):
    """Deployments by state, GPU memory by owner, host inventory age, RQ jobs and durations."""

    def __init__(self, now: datetime | None = None):
        self.now = now or timezone.now()

    def collect(self) -> Iterator[Metric]:
        yield from self._deployments()
        yield from self._gpu_memory()
        yield from self._hosts()
        yield from self._jobs()
        yield from self._gateway_usage()
        yield from scaling_metrics()

    def _gateway_usage(self) -> Iterator[Metric]:
        """Month-to-date (UTC) usage through the gateways, from the per-minute rows that every
        gateway process writes: one figure for all of them, kept across restarts."""
        month_start = self.now.astimezone(UTC).replace(
            day=1, hour=0, minute=0, second=0, microsecond=0
        )
        rows = (
            UsageMinute.objects.filter(minute__gte=month_start)
            .order_by()
            .values_list("team__slug", "model")
            .annotate(
                Sum("requests"), Sum("errors"), Sum("prompt_tokens"), Sum("completion_tokens")
            )
        )
        requests = GaugeMetricFamily(
            "berth_gateway_month_requests",
            "Requests through the gateways this calendar month (UTC), by team, model, outcome.",
            labels=["team", "model", "outcome"],
        )
        tokens = GaugeMetricFamily(
            "berth_gateway_month_tokens",
            "Tokens the engines reported this calendar month (UTC), by team, model and kind.",
            labels=["team", "model", "kind"],
        )
        for team, model, total, failed, prompt, completion in rows:
            requests.add_metric([team, model, "ok"], total - failed)
            requests.add_metric([team, model, "error"], failed)
            tokens.add_metric([team, model, "prompt"], prompt)
            tokens.add_metric([team, model, "completion"], completion)
        yield requests
        yield tokens

    def _deployments(self) -> Iterator[Metric]:
        """Deployments once each, by the state their replicas show (one ready replica: ready);
        replicas (engines) by their own state."""
        deployments = GaugeMetricFamily(
            "berth_deployments",
            "Deployments by lifecycle state (a deployment with replicas: the state they show).",
            labels=["state"],
        )
        replicas = GaugeMetricFamily(
            "berth_deployment_replicas",
            "Deployments' replicas (one engine each) by lifecycle state.",
            labels=["state"],
        )
        rows = list(Deployment.objects.order_by().values_list("pk", "replica_of_id", "state"))
        shown = groups.count_by_state(rows)
        engines = Counter(state for _, _, state in rows)
        for state in State:
            deployments.add_metric([state.value], shown.get(state.value, 0))
            replicas.add_metric([state.value], engines.get(state.value, 0))
        yield deployments
        yield replicas

    def _gpu_memory(self) -> Iterator[Metric]:
        by_owner = GaugeMetricFamily(
            "berth_gpu_memory_bytes",
            "GPU memory by owner: deployment (Berth's engines), foreign (anything else), free.",
            labels=["host", "gpu", "uuid", "owner"],
        )
        total = GaugeMetricFamily(
            "berth_gpu_memory_total_bytes", "GPU memory size.", labels=["host", "gpu", "uuid"]
        )
        gpus = (
            Gpu.objects.filter(present=True).select_related("host").order_by("host__name", "index")
        )
        for gpu in gpus:
            labels = [gpu.host.name, str(gpu.index), gpu.uuid]
            if gpu.memory_total_mib is not None:
                total.add_metric(labels, gpu.memory_total_mib * MIB)
            owners = {
                "deployment": gpu.memory_berth_mib,
                "foreign": gpu.memory_foreign_mib,
                "free": gpu.memory_free_mib,
            }
            for owner, mib in owners.items():
                if mib is not None:  # not read yet: no sample rather than a made-up zero
                    by_owner.add_metric([*labels, owner], mib * MIB)
        yield by_owner
        yield total

    def _hosts(self) -> Iterator[Metric]:
        inventory_age = GaugeMetricFamily(
            "berth_host_inventory_age_seconds",
            "Seconds since the host's newest GPU reading: grows while its agent is down or "
            "every source fails (absent for a host never read).",
            labels=["host"],
        )
        heartbeat_age = GaugeMetricFamily(
            "berth_host_heartbeat_age_seconds",
            "Seconds since the host's agent last sent a heartbeat.",
            labels=["host"],
        )
        placeable = GaugeMetricFamily(
            "berth_host_placeable",
            "1 when the host takes placements (agent alive, inventory readable).",
            labels=["host", "status"],
        )
        for host in Host.objects.annotate(newest_reading=Max("gpus__seen_at")):
            if host.newest_reading is not None:
                age = (self.now - host.newest_reading).total_seconds()
                inventory_age.add_metric([host.name], age)
            if host.last_heartbeat is not None:
                age = (self.now - host.last_heartbeat).total_seconds()
                heartbeat_age.add_metric([host.name], age)
            placeable.add_metric([host.name, host.state(self.now)], int(host.placeable(self.now)))
        yield inventory_age
        yield heartbeat_age
        yield placeable

    def _jobs(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "berth_rq_jobs",
            "Jobs in each RQ registry per queue (failed jobs stay until they expire or are "
            "cleared in the RQ dashboard).",
            labels=["queue", "state"],
        )
        durations = GaugeMetricFamily(
            "berth_rq_job_duration_seconds",
            "Run time of each queue's most recently finished jobs, by function.",
            labels=["queue", "function", "quantile"],
        )
        up = GaugeMetricFamily("berth_redis_up", "1 when Redis answered this scrape.")
        queues = [get_queue(name) for name in self._queue_names()]
        try:
            counts = _registry_counts(queues)
            recent = _recent_durations(queues)
        except RedisError:
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
            for (name, state), count in counts.items():
                jobs.add_metric([name, state], count)
            for (name, function), values in recent.items():
                for quantile, value in _quantiles(values).items():
                    durations.add_metric([name, function, quantile], value)
        yield jobs
        yield durations
        yield up

    def _queue_names(self) -> list[str]:
        return [DEFAULT_QUEUE, *(host.queue_name for host in Host.objects.all())]


def _registry_counts(queues: list[Any]) -> dict[tuple[str, str], int]:
    """Every queue's length and registry sizes, in one round trip."""
    pipeline = redis_connection().pipeline(transaction=False)
    for queue in queues:
        pipeline.llen(queue.key)
        for state in JOB_STATES[1:]:
            pipeline.zcard(getattr(queue, f"{state}_job_registry").key)
    answers = iter(pipeline.execute())
    return {(queue.name, state): next(answers) for queue in queues for state in JOB_STATES}


def _recent_durations(queues: list[Any]) -> dict[tuple[str, str], list[float]]:
    """Run times by queue and function of each queue's most recently finished jobs, read from
    three fields of each job's hash (no job is deserialized) in two round trips in all."""
    per_queue = max(MIN_DURATION_SAMPLE, DURATION_SAMPLE // len(queues))
    connection = redis_connection()
    pipeline = connection.pipeline(transaction=False)
    for queue in queues:
        pipeline.zrange(queue.finished_job_registry.key, 0, per_queue - 1, desc=True)
    sampled = [
        (queue.name, queue.finished_job_registry.parse_job_id(raw))
        for queue, ids in zip(queues, pipeline.execute(), strict=True)
        for raw in ids
    ]
    pipeline = connection.pipeline(transaction=False)
    for _name, job_id in sampled:
        pipeline.hmget(Job.key_for(job_id), "description", "started_at", "ended_at")
    by_function: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (name, _id), (description, started, ended) in zip(sampled, pipeline.execute(), strict=True):
        if description and started and ended:
            # RQ's description is the call, "deployments.runtime.jobs.watch_job(1, 1)".
            function = description.decode().split("(", 1)[0]
            seconds = (_when(ended) - _when(started)).total_seconds()
            by_function[name, function].append(max(seconds, 0.0))
    return by_function


def _when(raw: bytes) -> datetime:
    """RQ's UTC time stamps (``2026-11-27T07:19:38.123456Z``); fromisoformat is C-fast."""
    return datetime.fromisoformat(raw.decode())


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if len(ordered) == 1:
        return {str(q): ordered[0] for q in QUANTILES}
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return {str(q): cuts[round(q * 100) - 1] for q in QUANTILES}


def render_metrics(now: datetime | None = None) -> bytes:
    """The exposition text of one scrape (a registry made for it, so nothing is kept)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BerthCollector(now))
    return generate_latest(registry)


def _authorized(request: HttpRequest) -> bool | None:
    """True: a matching bearer token or an admin session. None: no credentials at all."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        expected = settings.BERTH_METRICS_TOKEN
        return bool(
            expected
            and scheme.lower() == "bearer"
            and hmac.compare_digest(token.strip().encode(), expected.encode())
        )
    user = request.user
    if not user.is_authenticated:
        return None
    return bool(user.is_active and user.is_staff)


@login_not_required
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus exposition; 401 without credentials, 403 with wrong ones."""
    allowed = _authorized(request)
    if allowed is None:
        response = HttpResponse(
            "Send Authorization: Bearer <BERTH_METRICS_TOKEN>, or sign in as an admin.\n",
            status=401,
            content_type="text/plain",
        )
        response["WWW-Authenticate"] = 'Bearer realm="berth-metrics"'
        return response
    if not allowed:
        return HttpResponse(
            "Wrong token or not an admin. Use the token in BERTH_METRICS_TOKEN.\n",
            status=403,
            content_type="text/plain",
        )
    return HttpResponse(render_metrics(), content_type=CONTENT_TYPE_LATEST)
