"""The teacher's Prometheus metrics: TeacherMetrics (queue, batches, requests, latency) and
the collector that reads each loaded model's count of forwarded tokens from its backend."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from services.teacher.batcher import BatchRecord, MicroBatcher
from services.teacher.registry import ModelRegistry


class TeacherMetrics:
    """Prometheus metrics of one app instance, per model where it matters."""

    def __init__(self, registry_of_models: ModelRegistry, batcher: MicroBatcher) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("sage_teacher_queue_depth", "Jobs waiting", registry=r)
        self.queue_depth.set_function(lambda: batcher.depth)
        self.batch_items = Histogram(
            "sage_teacher_batch_items",
            "Items per forward",
            ["model", "kind"],
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.batch_tokens = Histogram(
            "sage_teacher_batch_tokens",
            "Tokens per forward",
            ["model", "kind"],
            registry=r,
            buckets=(64, 256, 1024, 4096, 16384, 65536),
        )
        self.forward_seconds = Histogram(
            "sage_teacher_forward_seconds", "Time per forward", ["model", "kind"], registry=r
        )
        r.register(_ForwardedTokens(registry_of_models))
        self.requests = Counter(
            "sage_teacher_requests", "Answered requests", ["model", "route"], registry=r
        )
        self.rejections = Counter(
            "sage_teacher_rejections", "Refused requests", ["reason"], registry=r
        )
        self.latency = Histogram(
            "sage_teacher_request_seconds", "Request latency by route", ["route"], registry=r
        )

    def record_batch(self, record: BatchRecord) -> None:
        model, kind = record.key[0].name, record.key[1]
        self.batch_items.labels(model, kind).observe(record.items)
        self.batch_tokens.labels(model, kind).observe(record.tokens)
        self.forward_seconds.labels(model, kind).observe(record.seconds)


class _ForwardedTokens(Collector):
    """Each loaded model's own count of forwarded tokens, read from its backend."""

    def __init__(self, models: ModelRegistry) -> None:
        self.models = models

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "sage_teacher_tokens_forwarded",
            "Tokens the backend ran through its model",
            labels=["model"],
        )
        for model in list(self.models.models.values()):
            family.add_metric([model.name], model.backend.tokens_forwarded)
        yield family
