"""The console's ``/metrics`` for autoscaled deployments: the replicas wanted and ready, whether
idle, and the last wake's time from its first request to ready."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from deployments.models import Deployment
from deployments.states import State


def scaling_metrics() -> Iterator[Metric]:
    labels = ["team", "deployment"]
    desired = GaugeMetricFamily(
        "berth_scaling_desired_replicas", "Replicas the scaler wants now.", labels=labels
    )
    ready = GaugeMetricFamily(
        "berth_scaling_ready_replicas", "Replicas ready (serving) now.", labels=labels
    )
    idle = GaugeMetricFamily(
        "berth_scaling_idle", "1 while scaled to zero (idle), else 0.", labels=labels
    )
    wake = GaugeMetricFamily(
        "berth_scaling_last_wake_seconds",
        "The last wake: from the request that woke it to its first replica ready.",
        labels=labels,
    )
    primaries = list(
        Deployment.objects.primaries()
        .filter(autoscale=True)
        .select_related("team")
        .order_by("team__slug", "name", "pk")
    )
    serving = Counter(
        Deployment.objects.filter(state=State.READY)
        .filter(replica_of__in=primaries)
        .values_list("replica_of_id", flat=True)
    )
    for primary in primaries:
        if primary.state in (State.STOPPED, State.FAILED):
            continue
        names = [primary.team.slug, primary.name]
        desired.add_metric(names, primary.replicas)
        ready.add_metric(names, serving[primary.pk] + (primary.state == State.READY))
        idle.add_metric(names, int(primary.state == State.IDLE))
        if primary.woken_at and primary.ready_at and primary.ready_at > primary.woken_at:
            wake.add_metric(names, (primary.ready_at - primary.woken_at).total_seconds())
    yield from (desired, ready, idle, wake)
