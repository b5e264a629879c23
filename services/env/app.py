"""The env service's FastAPI app: sessions over HTTP, per the contract in client/protocol.py.

create_app assembles the layers: the routes (services/env/routes.py), their
dependencies (services/env/deps.py), the serving logic (services/env/service.py)
and its metrics (services/env/metrics.py), over the session store
(services/env/sessions.py) and the shared HTTP plumbing (services/http.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.env.routes import router
from services.env.service import EnvService
from services.env.settings import EnvSettings
from services.http import (
    BodyLimitMiddleware,
    LatencyMiddleware,
    health_router,
    install_error_handlers,
)


def create_app(settings: EnvSettings | None = None) -> FastAPI:
    """Build the env service. Settings default to the SAGE_ENV_* environment variables."""
    settings = settings or EnvSettings()
    service = EnvService(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Import and build each family before saying ready.
        families = [service.family(name) for name in settings.environment_names()]
        service.any_blocking = any(family.blocking for family in families)
        service.ready = True
        sweep_every = min(max(settings.session_ttl_s / 4, 0.05), 30.0)

        async def sweep() -> None:
            while True:
                await asyncio.sleep(sweep_every)
                await service.evict_idle()

        sweeper = asyncio.create_task(sweep())
        try:
            yield
        finally:
            sweeper.cancel()
            service.ready = False
            await service.close_episodes(service.store.pop_all())

    app = FastAPI(
        title="SAGE-OPD environment service",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    app.add_middleware(LatencyMiddleware, histogram=service.metrics.latency)
    app.include_router(router)
    app.include_router(
        health_router(
            service.metrics.registry,
            lambda: None if service.ready else "The service is starting.",
        )
    )
    return app
