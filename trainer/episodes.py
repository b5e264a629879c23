"""One episode played to its end, for any policy; many episodes at once.

``play_episode`` opens a session, asks the agent for an action, steps the session,
tells the agent what happened, and closes the session: the one loop that steps an
environment. What a policy keeps of its episode (a student's sampled tokens, the
expert's advice at each state, a reference policy's outcome) is the agent's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from tqdm.auto import tqdm

from client.env import EnvClient
from client.protocol import SessionCreated, Split, StepResult

T = TypeVar("T")


@dataclass(frozen=True)
class Task:
    """Which episode to play: an environment's task on a split, within ``max_turns``."""

    env: str
    split: Split
    task_id: int
    max_turns: int | None = None
    seed: int = 0


class Agent(Protocol):
    """A policy playing one episode."""

    async def begin(self, env: EnvClient, session: SessionCreated) -> None:
        """The session is open; ``session.first`` is the first observation."""

    async def act(self, state: StepResult) -> str | None:
        """The action to take in ``state`` (None ends the episode here)."""

    async def after(self, action: str, result: StepResult) -> bool:
        """``action`` led to ``result``; True ends the episode before it is done."""


async def play_episode(env: EnvClient, task: Task, agent: Agent) -> StepResult:
    """Play ``task`` with ``agent`` until the episode is done or the agent ends it; the
    session is closed afterwards. Returns the last state (``won``, ``turn``)."""
    async with env.open_session(
        env=task.env,
        split=task.split,
        task_id=task.task_id,
        seed=task.seed,
        max_turns=task.max_turns,
    ) as session:
        await agent.begin(env, session)
        state = session.first
        while not state.done:
            action = await agent.act(state)
            if action is None:
                break
            state = await env.step(session.session_id, action)
            if await agent.after(action, state):
                break
    return state


async def play_many(
    play: Callable[[int], Awaitable[T]],
    task_ids: list[int],
    concurrency: int,
    desc: str,
    progress: bool = True,
) -> list[T]:
    """``play(task_id)`` for every task, ``concurrency`` at a time, in order, with progress.

    The first failure cancels the episodes still running and is raised.
    """
    limit = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(task_ids), desc=desc, disable=not progress, leave=False)

    async def one(task_id: int) -> T:
        async with limit:
            result = await play(task_id)
        bar.update()
        return result

    tasks = [asyncio.ensure_future(one(t)) for t in task_ids]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
