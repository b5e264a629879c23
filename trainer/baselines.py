"""Reference policies played through the env service: the expert and a random admissible one.

They bound what a learned agent can do (the expert's success is the ceiling, the
random policy's the floor) and check a deployed env service end to end.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from tqdm.auto import tqdm

from client.env import EnvClient
from client.protocol import Split

Policy = Literal["expert", "random"]
T = TypeVar("T")


@dataclass(frozen=True)
class EpisodeSummary:
    task_id: int
    task_type: str
    won: bool
    turns: int


async def play_episode(
    client: EnvClient,
    policy: Policy,
    split: Split,
    task_id: int,
    env: str = "household",
    seed: int = 0,
) -> EpisodeSummary:
    """Play one task to the end with ``policy``; the session is closed afterwards."""
    rng = random.Random(seed * 1_000_003 + task_id)
    async with client.open_session(env=env, split=split, task_id=task_id, seed=seed) as created:
        result = created.first
        while not result.done:
            if policy == "expert":
                action = await client.expert_action(created.session_id)
                if action is None:  # already won at reset
                    break
            else:
                action = rng.choice(result.admissible_actions)
            result = await client.step(created.session_id, action)
    return EpisodeSummary(task_id, created.task.task_type, result.won, result.turn)


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


async def play_split(
    client: EnvClient,
    policy: Policy,
    split: Split,
    task_ids: list[int],
    env: str = "household",
    concurrency: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> list[EpisodeSummary]:
    """Play every task in ``task_ids``, ``concurrency`` episodes at a time."""
    return await play_many(
        lambda t: play_episode(client, policy, split, t, env, seed),
        task_ids,
        concurrency,
        f"{policy} on {split}",
        progress,
    )


def success_rate(episodes: list[EpisodeSummary]) -> float:
    return sum(e.won for e in episodes) / max(1, len(episodes))
