"""Prometheus metrics of one server (its own registry, exposed at ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "pr2_requests", "Generate requests served", ["protocol", "kind"], registry=r
        )
        self.tokens = Counter("pr2_tokens_generated", "Output tokens generated", registry=r)
        self.latency = Histogram(
            "pr2_request_latency_seconds",
            "Generate latency",
            ["protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.route_bytes = Counter(
            "pr2_route_bytes_sent", "Route payload bytes sent", ["protocol"], registry=r
        )
        self.weight_version = Gauge("pr2_weight_version", "Weight version being served", registry=r)
        self.weight_updates = Counter(
            "pr2_weight_updates", "Weight updates committed", ["protocol"], registry=r
        )
        self.weight_update_seconds = Histogram(
            "pr2_weight_update_seconds",
            "Weight push time (upload + verify + apply)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.weight_bytes = Counter("pr2_weight_bytes_received", "Weight upload bytes", registry=r)
        self.errors = Counter(
            "pr2_errors", "Requests refused or failed, by kind", ["kind"], registry=r
        )

    def observe_generate(self, protocol: str, rollouts, seconds: float) -> None:
        self.requests.labels(protocol=protocol, kind="generate").inc()
        self.tokens.inc(sum(len(r.output_token_ids) for r in rollouts))
        self.latency.labels(protocol=protocol).observe(seconds)

    def observe_stream(self, protocol: str, tokens: int, seconds: float) -> None:
        self.requests.labels(protocol=protocol, kind="stream").inc()
        self.tokens.inc(tokens)
        self.latency.labels(protocol=protocol).observe(seconds)

    def observe_push(self, protocol: str, version: int, size: int, seconds: float) -> None:
        self.weight_version.set(version)
        self.weight_updates.labels(protocol=protocol).inc()
        self.weight_update_seconds.observe(seconds)
        self.weight_bytes.inc(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
