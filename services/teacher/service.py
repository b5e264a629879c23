"""The teacher's serving logic: TeacherService holds the models, the micro-batcher, the
settings and the metrics, and queues each request's work; hold_model holds the active
model while a request uses it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from client.protocol import LoadModelRequest
from services.http import ServiceError
from services.teacher.batcher import DeadlineExceeded, Job, MicroBatcher, QueueFull
from services.teacher.limits import check_ids, check_size
from services.teacher.metrics import TeacherMetrics
from services.teacher.registry import (
    BackendFactory,
    LoadedModel,
    ModelRegistry,
    NoModel,
    SourcePolicy,
    default_backend_factory,
)
from services.teacher.settings import TeacherSettings


class TeacherService:
    def __init__(self, settings: TeacherSettings, factory: BackendFactory | None = None) -> None:
        self.settings = settings
        policy = SourcePolicy(settings.allowed_roots, settings.allowed_ids)
        if factory is None:

            def factory(request: LoadModelRequest):
                return default_backend_factory(request, settings.trust_remote_code, settings.device)

        self.models = ModelRegistry(policy, factory)
        self.batcher = MicroBatcher(
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue,
            enabled=settings.batching,
        )
        self.metrics = TeacherMetrics(self.models, self.batcher)
        self.batcher.on_batch = self.metrics.record_batch

    async def run(
        self,
        model: LoadedModel,
        kind: str,
        items: list[Any],
        run: Callable[[list[Any]], list[Any]],
        options: tuple[Any, ...],
        client_id: str,
        deadline_s: float | None,
    ) -> list[Any]:
        """Queue one request's items for the batcher; map its refusals to HTTP errors."""
        check_size(sum(item.num_tokens for item in items), self.settings.max_request_tokens)
        check_ids(model, [item.input_ids for item in items])
        deadline = time.monotonic() + (deadline_s or self.settings.default_deadline_s)
        job = Job(
            key=(model, kind, *options),
            items=items,
            run=run,
            client_id=client_id,
            deadline=deadline,
        )
        try:
            return await self.batcher.submit(job)
        except QueueFull as exc:
            self.metrics.rejections.labels("queue_full").inc()
            raise ServiceError(
                503,
                "queue_full",
                "The teacher's queue is full; retry shortly.",
                {"max_queue": self.settings.max_queue},
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from exc
        except DeadlineExceeded as exc:
            self.metrics.rejections.labels("deadline").inc()
            raise ServiceError(
                504, "deadline_exceeded", "The request's deadline passed before it was served."
            ) from exc


@contextmanager
def hold_model(service: TeacherService) -> Iterator[LoadedModel]:
    """The active model, held while the block runs so a swap drains it first."""
    try:
        model = service.models.acquire()
    except NoModel as exc:
        raise ServiceError(
            503, "no_model", "No teacher model is loaded.", headers={"Retry-After": "5"}
        ) from exc
    try:
        yield model
    finally:
        service.models.release(model)
