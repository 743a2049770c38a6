"""The gateway's own ``/metrics``: counters and histograms of this process.

Scraped per gateway process (each serves its own port) with the console's bearer token,
``BERTH_METRICS_TOKEN``; without a token configured the endpoint answers 403, since a gateway
has no sessions to recognise an admin by.
"""

from __future__ import annotations

import hmac

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics import Counter, Gauge, Histogram

# Bucket edges for the gateway's own time (sub-millisecond to 100 ms) and for latencies the
# engine dominates (10 ms to 2 minutes).
OVERHEAD_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    """One registry per gateway process (never the global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "berth_gateway_requests",
            "Requests answered, by model and HTTP status.",
            ["model", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "berth_gateway_tokens",
            "Tokens reported by the engines, by model and kind.",
            ["model", "kind"],
            registry=r,
        )
        self.errors = Counter(
            "berth_gateway_errors", "Refusals and failures, by error code.", ["code"], registry=r
        )
        self.overhead = Histogram(
            "berth_gateway_overhead_seconds",
            "The gateway's own time before a request goes to the engine.",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "berth_gateway_time_to_first_token_seconds",
            "From the request's arrival to the first byte of the engine's answer.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "berth_gateway_queue_wait_seconds",
            "Time a request waited for a replica (loading, saturated).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.wake_wait = Histogram(
            "berth_gateway_wake_seconds",
            "Time a request waited for an idle (scaled to zero) deployment to wake.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "berth_gateway_requests_in_flight", "Requests being served now.", registry=r
        )
        self.cache_age = Gauge(
            "berth_gateway_cache_age_seconds",
            "Seconds since keys and routes were last read from the database.",
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def authorized(header: bytes, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time; no token configured: no."""
    if not token:
        return False
    expected = f"Bearer {token}".encode()
    return hmac.compare_digest(header, expected)
