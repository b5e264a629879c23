"""Async client of the env service: typed calls for sessions, steps, actions and metadata.

Steps and expert questions of many sessions made side by side (one coroutine per
episode) travel as batch calls (client/coalesce.py), so each caller can be written
for its own session alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cached_property
from typing import Any

from client.coalesce import Coalescer
from client.http import JsonClient, RetryPolicy, ServiceCallError
from client.protocol import (
    API_PREFIX,
    AdmissibleActions,
    BatchExpertItem,
    BatchExpertRequest,
    BatchExpertResponse,
    BatchStepItem,
    BatchStepRequest,
    BatchStepResponse,
    CloseSessionsRequest,
    CloseSessionsResponse,
    CreatedItem,
    CreateSessionRequest,
    CreateSessionsRequest,
    CreateSessionsResponse,
    EnvironmentList,
    ErrorBody,
    ExpertAction,
    SessionAction,
    SessionCreated,
    SessionInfo,
    Split,
    StepResult,
)

__all__ = ["EnvClient", "RetryPolicy", "ServiceCallError"]


class EnvClient(JsonClient):
    """One client per process is enough: it pools connections and is safe to share."""

    async def environments(self) -> EnvironmentList:
        return await self.call("GET", f"{API_PREFIX}/envs", EnvironmentList, idempotent=True)

    async def split_size(self, env: str, split: str) -> int:
        """How many tasks ``env`` has in ``split``; LookupError naming what is served."""
        sizes = {e.name: e.splits for e in (await self.environments()).environments}
        if split not in sizes.get(env, {}):
            raise LookupError(f"{self.base_url} serves {sizes}; no {env}/{split}")
        return sizes[env][split]

    async def create_session(
        self,
        env: str = "household",
        split: Split = "train",
        task_id: int = 0,
        seed: int = 0,
        max_turns: int | None = None,
    ) -> SessionCreated:
        request = CreateSessionRequest(
            env=env, split=split, task_id=task_id, seed=seed, max_turns=max_turns
        )
        return await self.call("POST", f"{API_PREFIX}/sessions", SessionCreated, request)

    @asynccontextmanager
    async def open_session(
        self,
        env: str = "household",
        split: Split = "train",
        task_id: int = 0,
        seed: int = 0,
        max_turns: int | None = None,
    ) -> AsyncIterator[SessionCreated]:
        """A session for the block's duration: created on entry, closed on exit, come what may."""
        created = await self.create_session(env, split, task_id, seed, max_turns)
        try:
            yield created
        finally:
            await self.close_session(created.session_id)

    async def create_sessions(self, requests: list[CreateSessionRequest]) -> list[CreatedItem]:
        """Open many sessions in one call; each item holds its session or its own error."""
        response = await self.call(
            "POST",
            f"{API_PREFIX}/sessions/batch",
            CreateSessionsResponse,
            CreateSessionsRequest(sessions=requests),
        )
        return response.results

    async def close_sessions(self, session_ids: list[str]) -> CloseSessionsResponse:
        return await self.call(
            "POST",
            f"{API_PREFIX}/sessions/close",
            CloseSessionsResponse,
            CloseSessionsRequest(session_ids=session_ids),
            idempotent=True,  # closing twice lists the id as not found, nothing worse
        )

    async def session(self, session_id: str) -> SessionInfo:
        return await self.call(
            "GET", f"{API_PREFIX}/sessions/{session_id}", SessionInfo, idempotent=True
        )

    async def reset(self, session_id: str) -> StepResult:
        # A reset returns the episode to its start: repeating it is harmless.
        return await self.call(
            "POST", f"{API_PREFIX}/sessions/{session_id}/reset", StepResult, idempotent=True
        )

    async def step(self, session_id: str, action: str) -> StepResult:
        """Step one session (in one batch call with the steps other coroutines make now)."""
        return await self._steps(SessionAction(session_id=session_id, action=action))

    async def step_many(self, actions: dict[str, str]) -> list[BatchStepItem]:
        """Step several sessions in one call; each item holds its result or its own error."""
        steps = [SessionAction(session_id=sid, action=a) for sid, a in actions.items()]
        return await self._step_batch(steps)

    async def _step_batch(self, steps: list[SessionAction]) -> list[BatchStepItem]:
        response = await self.call(
            "POST", f"{API_PREFIX}/sessions/step", BatchStepResponse, BatchStepRequest(steps=steps)
        )
        return response.results

    @cached_property
    def _steps(self) -> Coalescer[SessionAction, StepResult]:
        async def send(steps: list[SessionAction]) -> list[StepResult | Exception]:
            return [_answer(item) for item in await self._step_batch(steps)]

        return Coalescer(send, key=lambda step: step.session_id)

    async def admissible_actions(self, session_id: str) -> list[str]:
        answer = await self.call(
            "GET",
            f"{API_PREFIX}/sessions/{session_id}/admissible",
            AdmissibleActions,
            idempotent=True,
        )
        return answer.admissible_actions

    async def expert(self, session_id: str, steps_left: bool = False) -> ExpertAction:
        """The expert's next action and, if asked and the environment can tell, its remaining
        steps (costlier: the environment plays the expert out to count them). Asked in one
        batch call with the questions other coroutines ask now."""
        return await self._experts[steps_left](session_id)

    async def expert_many(
        self, session_ids: list[str], steps_left: bool = False
    ) -> list[BatchExpertItem]:
        """The expert's next action in several sessions in one call; each item holds its
        answer or its own error."""
        response = await self.call(
            "POST",
            f"{API_PREFIX}/sessions/expert",
            BatchExpertResponse,
            BatchExpertRequest(session_ids=session_ids, steps_left=steps_left),
            idempotent=True,
        )
        return response.results

    @cached_property
    def _experts(self) -> dict[bool, Coalescer[str, ExpertAction]]:
        def batcher(steps_left: bool) -> Coalescer[str, ExpertAction]:
            async def send(session_ids: list[str]) -> list[ExpertAction | Exception]:
                return [_answer(i) for i in await self.expert_many(session_ids, steps_left)]

            return Coalescer(send, key=lambda session_id: session_id)

        return {False: batcher(False), True: batcher(True)}

    async def expert_action(self, session_id: str) -> str | None:
        return (await self.expert(session_id)).action

    async def close_session(self, session_id: str) -> None:
        await self.call("DELETE", f"{API_PREFIX}/sessions/{session_id}")


def _answer(item: BatchStepItem | BatchExpertItem) -> Any:
    """A batch item's result, or the error its caller would have had from a single call."""
    if item.error is not None or item.result is None:
        error = item.error or ErrorBody(code="missing_result", message="No result came back.")
        return ServiceCallError(item.status, error)
    return item.result
