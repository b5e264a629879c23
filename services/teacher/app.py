"""The teacher service's FastAPI app: create_app wires the service, its lifespan, the
middleware and the routers (services/teacher/routes/) into one app.

The service's logic lives in service.py, its metrics in metrics.py, the routes'
dependencies in deps.py and the request limits in limits.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI

from client.protocol import API_PREFIX, LoadModelRequest
from services.http import (
    BodyLimitMiddleware,
    FastPathMiddleware,
    LatencyMiddleware,
    health_router,
    install_error_handlers,
)
from services.teacher.registry import BackendFactory
from services.teacher.routes import admin, native, openai
from services.teacher.service import TeacherService
from services.teacher.settings import TeacherSettings

log = logging.getLogger(__name__)


def create_app(
    settings: TeacherSettings | None = None, factory: BackendFactory | None = None
) -> FastAPI:
    """Build the teacher service (settings default to SAGE_TEACHER_* variables).

    ``settings.model`` is loaded at start-up; the operator named it, so its folder
    joins the allowed roots.
    """
    settings = settings or TeacherSettings()
    service = TeacherService(settings, factory)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        if settings.model:
            from pathlib import Path

            if Path(settings.model).exists():
                service.models.policy.allow_root(settings.model)
            await service.models.load(
                LoadModelRequest(
                    name=settings.model_name,
                    source=settings.model,
                    revision=settings.revision,
                    gguf_file=settings.gguf_file,
                    dtype=settings.dtype,  # type: ignore[arg-type]
                    backend=settings.backend,  # type: ignore[arg-type]
                    trust_remote_code=settings.trust_remote_code,
                    activate=True,
                ),
                check_policy=False,
            )
        try:
            yield
        finally:
            await service.batcher.stop()
            await service.models.close()

    app = FastAPI(title="SAGE-OPD teacher service", version="1", lifespan=lifespan)
    app.state.service = service
    # The score route's common case skips FastAPI's per-request work: innermost, so the
    # error, body limit and latency middleware below still wrap it.
    app.add_middleware(
        FastPathMiddleware, handlers={f"{API_PREFIX}/score": partial(native.fast_score, service)}
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(LatencyMiddleware, histogram=service.metrics.latency)
    app.include_router(native.router)
    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(
        health_router(
            service.metrics.registry,
            lambda: "No teacher model is loaded yet." if service.models.active is None else None,
            retry_after_s=2,
        )
    )
    return app
