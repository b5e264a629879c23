"""The env service's serving logic: opening, stepping, resetting and closing sessions,
asking their experts, running a batch's items, evicting idle sessions.

EnvService is everything a request needs (settings, the session store, metrics); it
turns the session store's and the environments' failures into ServiceErrors.
Environment calls that may block (a JVM, a game engine) run in worker threads;
the embedded world is fast enough to run on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from client.protocol import CreateSessionRequest, TaskInfo
from services.env.base import EnvironmentFamily, Episode, EpisodeCrashed, StepOutcome
from services.env.metrics import EnvMetrics
from services.env.registry import UnknownEnvironment, get_family
from services.env.sessions import (
    EpisodeFinished,
    Session,
    SessionLimitReached,
    SessionNotFound,
    SessionStore,
)
from services.env.settings import EnvSettings
from services.http import ServiceError

log = logging.getLogger(__name__)
T = TypeVar("T")


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
            "task": task_info(session).model_dump(),
            "first": step_result(session, first),
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


def task_info(session: Session) -> TaskInfo:
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


def step_result(session: Session, outcome: StepOutcome) -> dict[str, Any]:
    """A StepResult as plain data: the hot path of every step.

    Single-item routes hand it to FastAPI, which validates it against the
    response model; the batch routes serialise it directly (see _json in routes.py), because
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


async def step(service: EnvService, session: Session, action: str) -> dict[str, Any]:
    outcome = await service.run(session, session.step, action)
    service.metrics.steps_of(session.task.env).inc()
    return step_result(session, outcome)


async def expert(service: EnvService, session: Session, steps_left: bool) -> dict[str, Any]:
    action = await service.run(session, session.episode.expert_action)
    left = await service.run(session, session.episode.expert_steps_left) if steps_left else None
    return {"session_id": session.id, "action": action, "steps_left": left}
