"""Prometheus metrics of the gateway (Contract 1), in a registry of its own per app instance."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class GatewayMetrics:
    """Request counts, latency histograms, canary share, lease expirations and rows written."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        disable_created_metrics()  # no *_created series: they double the exposition for no use here
        self.requests = Counter(
            "canary_gateway_requests",
            "Predictions answered, by model, version, arm and status (ok or error).",
            ["model", "version", "arm", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "canary_gateway_request_latency_seconds",
            "Time spent in the model call per prediction.",
            ["model", "version", "arm"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.canary_percent = Gauge(
            "canary_gateway_canary_percent",
            "Current canary share of the route, percent.",
            ["model"],
            registry=self.registry,
        )
        self.lease_expirations = Counter(
            "canary_gateway_lease_expirations",
            "Leases that ran out and returned all traffic to stable.",
            ["model"],
            registry=self.registry,
        )
        self.rows_written = Counter(
            "canary_gateway_log_rows_written", "Prediction rows committed to the log.", registry=self.registry
        )

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
