"""Prometheus metrics of the gateway, on a registry of its own (one per app, so two apps in one
process, as in the tests, never share counters)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        labels = ("api", "node", "model", "outcome")
        self.jobs = Counter(
            "corral_gateway_jobs",
            "Requests that became jobs, by API, serving node, model and outcome",
            labels,
            registry=self.registry,
        )
        self.refused = Counter(
            "corral_gateway_refused_requests",
            "Requests answered with an HTTP error before any token, by API and status",
            ("api", "status"),
            registry=self.registry,
        )
        self.first_token = Histogram(
            "corral_gateway_time_to_first_token_seconds",
            "From the request's job being submitted to its first token",
            ("api", "node", "model"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.total = Histogram(
            "corral_gateway_request_duration_seconds",
            "From the request's job being submitted to its last token",
            ("api", "node", "model"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "corral_gateway_tokens",
            "Tokens as the backends counted them, by kind (prompt or completion)",
            ("node", "model", "kind"),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "corral_gateway_in_flight_streams",
            "Jobs the gateway is following now",
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def job_started(self) -> None:
        self.in_flight.inc()

    def job_ended(
        self,
        *,
        api: str,
        node: str,
        model: str,
        outcome: str,
        submitted_at: float,
        first_token_at: float | None,
        prompt_tokens: int | None,
        completion_tokens: int,
    ) -> None:
        self.in_flight.dec()
        self.jobs.labels(api, node, model, outcome).inc()
        if first_token_at is not None:
            self.first_token.labels(api, node, model).observe(first_token_at - submitted_at)
        if outcome == "ok":
            self.total.labels(api, node, model).observe(time.monotonic() - submitted_at)
        if prompt_tokens:
            self.tokens.labels(node, model, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(node, model, "completion").inc(completion_tokens)
