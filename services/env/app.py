"""The env service's FastAPI app: sessions over HTTP, per the contract in client/protocol.py.

Routes are thin: they translate between the wire models and the session store.
Environment calls that may block (a JVM, a game engine) run in worker threads;
the embedded world is fast enough to run on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from pydantic_core import to_json

from client.protocol import (
    API_PREFIX,
    AdmissibleActions,
    BatchExpertRequest,
    BatchExpertResponse,
    BatchStepRequest,
    BatchStepResponse,
    CloseSessionsRequest,
    CloseSessionsResponse,
    CreateSessionRequest,
    CreateSessionsRequest,
    CreateSessionsResponse,
    EnvironmentInfo,
    EnvironmentList,
    ErrorBody,
    ExpertAction,
    SessionCreated,
    SessionInfo,
    StepRequest,
    StepResult,
    TaskInfo,
)
from services.env.base import EnvironmentFamily, Episode, EpisodeCrashed, StepOutcome
from services.env.registry import UnknownEnvironment, get_family
from services.env.sessions import (
    EpisodeFinished,
    Session,
    SessionLimitReached,
    SessionNotFound,
    SessionStore,
)
from services.env.settings import EnvSettings
from services.http import (
    BodyLimitMiddleware,
    LatencyMiddleware,
    ServiceError,
    health_router,
    install_error_handlers,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


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


class EnvService:
    """Everything a request needs: settings, sessions, metrics."""

    def __init__(self, settings: EnvSettings) -> None:
        self.settings = settings
        self.store = SessionStore(settings.max_sessions, settings.session_ttl_s)
        self.metrics = EnvMetrics()
        self.ready = False
        self.any_blocking = False  # set at start-up, once the families are built

    def family(self, name: str) -> EnvironmentFamily:
        if name not in self.settings.environment_names():
            raise ServiceError(
                404,
                "environment_not_found",
                f"This service does not serve the environment {name!r}.",
                {"served": self.settings.environment_names()},
            )
        try:
            return get_family(name)
        except UnknownEnvironment as exc:
            raise ServiceError(
                404, "environment_not_found", f"No environment named {name!r}."
            ) from exc

    def session(self, session_id: str) -> Session:
        try:
            return self.store.get(session_id)
        except SessionNotFound as exc:
            raise ServiceError(
                404, "session_not_found", f"No live session {session_id!r}."
            ) from exc

    async def run(self, session: Session, fn: Callable[..., T], *args: Any) -> T:
        """Call into the session's episode; a crash drops the session, never the service.

        A blocking engine runs in a worker thread, one call per session at a time
        (the session's lock); an in-loop world's call cannot be interleaved, so it
        needs no lock.
        """
        try:
            if session.blocking:
                async with session.lock:
                    return await asyncio.to_thread(fn, *args)
            return fn(*args)
        except EpisodeFinished as exc:
            raise ServiceError(
                409,
                "episode_finished",
                "This episode is over; reset the session or close it.",
                {"session_id": session.id},
            ) from exc
        except Exception as exc:
            log.exception("environment failed in session %s", session.id)
            self.store.discard(session.id)
            self.metrics.sessions.set(len(self.store))
            await self.close_episodes([session])
            crashed = isinstance(exc, EpisodeCrashed)
            raise ServiceError(
                502,
                "environment_crashed" if crashed else "environment_failed",
                f"The environment {'crashed' if crashed else 'failed'} and the session was "
                f"closed: {exc}",
                {"session_id": session.id, "env": session.task.env},
            ) from exc

    async def open_session(self, body: CreateSessionRequest) -> dict[str, Any]:
        """Build the task's episode, register it, reset it: a SessionCreated as plain data.

        Raises ServiceError when it can't."""
        family = self.family(body.env)
        if not self.store.has_room():
            await self.evict_idle()  # the sweeper may not have run since they expired
            if not self.store.has_room():
                raise self._cap_reached(self.store.retry_after_s())
        try:
            if family.blocking:
                episode = await asyncio.to_thread(family.make, body.split, body.task_id, body.seed)
            else:
                episode = family.make(body.split, body.task_id, body.seed)
        except KeyError as exc:
            raise ServiceError(
                404,
                "task_not_found",
                f"{body.env} has no task {body.task_id} in split {body.split!r}.",
                {"splits": family.splits()},
            ) from exc
        try:
            session = self.store.add(episode, body.max_turns, blocking=family.blocking)
        except SessionLimitReached as exc:  # filled up while the episode was being built
            await self.close_episode(episode, family.blocking)
            raise self._cap_reached(exc.retry_after_s) from exc
        self.metrics.sessions.set(len(self.store))
        first = await self.run(session, session.reset)
        return {
            "session_id": session.id,
            "task": _task_info(session).model_dump(),
            "first": _step_result(session, first),
        }

    def _cap_reached(self, retry_after_s: int) -> ServiceError:
        self.metrics.rejections.labels("session_cap").inc()
        return ServiceError(
            503,
            "session_cap",
            f"The service holds its maximum of {self.store.max_sessions} sessions.",
            {"max_sessions": self.store.max_sessions},
            headers={"Retry-After": str(retry_after_s)},
        )

    async def close_session(self, session_id: str) -> None:
        try:
            session = self.store.pop(session_id)
        except SessionNotFound as exc:
            raise ServiceError(
                404, "session_not_found", f"No live session {session_id!r}."
            ) from exc
        self.metrics.sessions.set(len(self.store))
        await self.close_episodes([session])

    async def each(self, calls: Iterable[Awaitable[T]]) -> list[T]:
        """Await per-item calls of a batch: side by side when an engine blocks in threads,
        one after another (no task per item) when every world runs on the event loop."""
        if self.any_blocking:
            return list(await asyncio.gather(*calls))
        return [await call for call in calls]

    async def close_episode(self, episode: Episode, blocking: bool) -> None:
        try:
            await asyncio.to_thread(episode.close) if blocking else episode.close()
        except Exception:  # closing is best effort; the session is gone either way
            log.warning("closing an episode of %s failed", episode.task.env, exc_info=True)

    async def close_episodes(self, sessions: list[Session]) -> None:
        for session in sessions:
            await self.close_episode(session.episode, session.blocking)

    async def evict_idle(self) -> int:
        expired = self.store.pop_expired()
        if expired:
            self.metrics.evictions.inc(len(expired))
            self.metrics.sessions.set(len(self.store))
            await self.close_episodes(expired)
        return len(expired)


def _task_info(session: Session) -> TaskInfo:
    task = session.task
    return TaskInfo(
        env=task.env,
        split=task.split,
        task_id=task.task_id,
        task_type=task.task_type,
        goal=task.goal,
        max_turns=session.max_turns,
        extra=task.extra,
    )


def _step_result(session: Session, outcome: StepOutcome) -> dict[str, Any]:
    """A StepResult as plain data: the hot path of every step.

    Single-item routes hand it to FastAPI, which validates it against the
    response model; the batch routes serialise it directly (see _json), because
    building a pydantic object per step costs more than the step itself.
    """
    return {
        "session_id": session.id,
        "observation": outcome.observation,
        "turn": session.turn,
        "done": session.done,
        "won": session.won,
        "truncated": session.truncated,
        "score": session.score,
        "admissible_actions": outcome.admissible_actions,
    }


def _json(payload: Any, status_code: int = 200) -> Response:
    # pydantic-core's serialiser: several times faster than json.dumps on large answers.
    return Response(to_json(payload), status_code=status_code, media_type="application/json")


def _error_item(exc: ServiceError, **fields: Any) -> dict[str, Any]:
    return {
        **fields,
        "result": None,
        "error": exc.body.model_dump(mode="json"),
        "status": exc.status,
    }


async def get_service(request: Request) -> EnvService:
    # async: a plain def dependency would be run in a worker thread on every request.
    return request.app.state.service


Service = Annotated[EnvService, Depends(get_service)]
router = APIRouter(prefix=API_PREFIX)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 404, 409, 413, 422, 502, 503)
}


@router.get("/envs", response_model=EnvironmentList)
async def list_environments(service: Service) -> EnvironmentList:
    names = service.settings.environment_names()
    return EnvironmentList(
        environments=[
            EnvironmentInfo(name=name, splits=service.family(name).splits()) for name in names
        ]
    )


@router.post("/sessions", response_model=SessionCreated, status_code=201, responses=_ERRORS)
async def create_session(body: CreateSessionRequest, service: Service) -> dict[str, Any]:
    return await service.open_session(body)


@router.post(
    "/sessions/batch", response_model=CreateSessionsResponse, status_code=201, responses=_ERRORS
)
async def create_sessions(body: CreateSessionsRequest, service: Service) -> Response:
    """Open many sessions in one call; each item carries its session or its own error."""

    async def one(request: CreateSessionRequest) -> dict[str, Any]:
        try:
            return {"result": await service.open_session(request), "error": None, "status": 201}
        except ServiceError as exc:
            return _error_item(exc)

    items = await service.each(one(request) for request in body.sessions)
    return _json({"results": items}, status_code=201)


@router.post("/sessions/close", response_model=CloseSessionsResponse, responses=_ERRORS)
async def close_sessions(body: CloseSessionsRequest, service: Service) -> CloseSessionsResponse:
    """Close many sessions in one call; ids that are not live are listed, not an error."""
    closed, not_found = [], []
    for session_id in body.session_ids:
        try:
            await service.close_session(session_id)
            closed.append(session_id)
        except ServiceError:
            not_found.append(session_id)
    return CloseSessionsResponse(closed=closed, not_found=not_found)


@router.get("/sessions/{session_id}", response_model=SessionInfo, responses=_ERRORS)
async def session_info(session_id: str, service: Service) -> SessionInfo:
    session = service.session(session_id)
    return SessionInfo(
        session_id=session.id,
        task=_task_info(session),
        turn=session.turn,
        done=session.done,
        won=session.won,
    )


@router.post("/sessions/{session_id}/reset", response_model=StepResult, responses=_ERRORS)
async def reset_session(session_id: str, service: Service) -> dict[str, Any]:
    session = service.session(session_id)
    outcome = await service.run(session, session.reset)
    return _step_result(session, outcome)


async def _step(service: EnvService, session: Session, action: str) -> dict[str, Any]:
    outcome = await service.run(session, session.step, action)
    service.metrics.steps_of(session.task.env).inc()
    return _step_result(session, outcome)


@router.post("/sessions/{session_id}/step", response_model=StepResult, responses=_ERRORS)
async def step_session(session_id: str, body: StepRequest, service: Service) -> dict[str, Any]:
    return await _step(service, service.session(session_id), body.action)


@router.post("/sessions/step", response_model=BatchStepResponse, responses=_ERRORS)
async def step_sessions(body: BatchStepRequest, service: Service) -> Response:
    """Step many sessions in one call; each item carries its own result or error."""

    async def one(session_id: str, action: str) -> dict[str, Any]:
        try:
            result = await _step(service, service.session(session_id), action)
            return {"session_id": session_id, "result": result, "error": None, "status": 200}
        except ServiceError as exc:
            return _error_item(exc, session_id=session_id)

    items = await service.each(one(s.session_id, s.action) for s in body.steps)
    return _json({"results": items})


@router.get(
    "/sessions/{session_id}/admissible", response_model=AdmissibleActions, responses=_ERRORS
)
async def admissible_actions(session_id: str, service: Service) -> AdmissibleActions:
    session = service.session(session_id)
    actions = await service.run(session, session.episode.admissible_actions)
    return AdmissibleActions(session_id=session.id, admissible_actions=actions)


async def _expert(service: EnvService, session: Session, steps_left: bool) -> dict[str, Any]:
    action = await service.run(session, session.episode.expert_action)
    left = await service.run(session, session.episode.expert_steps_left) if steps_left else None
    return {"session_id": session.id, "action": action, "steps_left": left}


@router.get("/sessions/{session_id}/expert", response_model=ExpertAction, responses=_ERRORS)
async def expert_action(
    session_id: str, service: Service, steps_left: bool = False
) -> dict[str, Any]:
    """The expert's next action; with ``?steps_left=true`` also its remaining steps
    (the environment plays its expert out on a copy, so only callers who need it pay)."""
    return await _expert(service, service.session(session_id), steps_left)


@router.post("/sessions/expert", response_model=BatchExpertResponse, responses=_ERRORS)
async def expert_actions(body: BatchExpertRequest, service: Service) -> Response:
    """The expert's next action in many sessions in one call; each item carries its own
    answer or error."""

    async def one(session_id: str) -> dict[str, Any]:
        try:
            result = await _expert(service, service.session(session_id), body.steps_left)
            return {"session_id": session_id, "result": result, "error": None, "status": 200}
        except ServiceError as exc:
            return _error_item(exc, session_id=session_id)

    items = await service.each(one(session_id) for session_id in body.session_ids)
    return _json({"results": items})


@router.delete("/sessions/{session_id}", status_code=204, responses=_ERRORS)
async def close_session(session_id: str, service: Service) -> Response:
    await service.close_session(session_id)
    return Response(status_code=204)


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
