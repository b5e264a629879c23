"""Async client of the env service: typed calls for sessions, steps, actions and metadata."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from client.http import JsonClient, RetryPolicy, ServiceCallError
from client.protocol import (
    API_PREFIX,
    AdmissibleActions,
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
    ExpertAction,
    SessionAction,
    SessionCreated,
    SessionInfo,
    Split,
    StepRequest,
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
        return await self.call(
            "POST",
            f"{API_PREFIX}/sessions/{session_id}/step",
            StepResult,
            StepRequest(action=action),
        )

    async def step_many(self, actions: dict[str, str]) -> list[BatchStepItem]:
        """Step several sessions in one call; each item holds its result or its own error."""
        request = BatchStepRequest(
            steps=[SessionAction(session_id=sid, action=a) for sid, a in actions.items()]
        )
        response = await self.call(
            "POST", f"{API_PREFIX}/sessions/step", BatchStepResponse, request
        )
        return response.results

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
        steps (costlier: the environment plays the expert out to count them)."""
        return await self.call(
            "GET",
            f"{API_PREFIX}/sessions/{session_id}/expert",
            ExpertAction,
            idempotent=True,
            params={"steps_left": "true"} if steps_left else None,
        )

    async def expert_action(self, session_id: str) -> str | None:
        return (await self.expert(session_id)).action

    async def close_session(self, session_id: str) -> None:
        await self.call("DELETE", f"{API_PREFIX}/sessions/{session_id}")
