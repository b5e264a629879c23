"""The env service's Prometheus metrics: sessions, steps, evictions, rejections, latency."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)


class EnvMetrics:
    """Prometheus metrics of one app instance (own registry: several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions = Gauge("sage_env_sessions", "Live sessions", registry=self.registry)
        self.steps = Counter("sage_env_steps", "Actions executed", ["env"], registry=self.registry)
        self.evictions = Counter(
            "sage_env_sessions_evicted", "Sessions closed for idling", registry=self.registry
        )
        self.rejections = Counter(
            "sage_env_rejections", "Requests refused", ["reason"], registry=self.registry
        )
        self.latency = Histogram(
            "sage_env_request_seconds",
            "Request latency by route",
            ["route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=self.registry,
        )
        self._steps_by_env: dict[str, Any] = {}

    def steps_of(self, env: str) -> Any:
        """The steps counter's child for ``env`` (looked up once, not on every step)."""
        if env not in self._steps_by_env:
            self._steps_by_env[env] = self.steps.labels(env)
        return self._steps_by_env[env]
