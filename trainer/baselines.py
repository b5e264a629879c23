"""Reference policies played through the env service: the expert and a random admissible one.

They bound what a learned agent can do (the expert's success is the ceiling, the
random policy's the floor) and check a deployed env service end to end.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from client.env import EnvClient
from client.protocol import SessionCreated, Split, StepResult
from trainer.episodes import Task, play_episode, play_many

Policy = Literal["expert", "random"]


@dataclass(frozen=True)
class EpisodeSummary:
    task_id: int
    task_type: str
    won: bool
    turns: int


@dataclass
class ReferenceAgent:
    """The expert (the env service's) or a random admissible action, each turn."""

    policy: Policy
    rng: random.Random
    env: EnvClient | None = None
    session_id: str = ""
    task_type: str = ""

    async def begin(self, env: EnvClient, session: SessionCreated) -> None:
        self.env, self.session_id = env, session.session_id
        self.task_type = session.task.task_type

    async def act(self, state: StepResult) -> str | None:
        if self.policy == "random":
            return self.rng.choice(state.admissible_actions)
        assert self.env is not None
        return await self.env.expert_action(self.session_id)  # None: already won at reset

    async def after(self, action: str, result: StepResult) -> bool:
        return False


async def play_reference(
    client: EnvClient,
    policy: Policy,
    split: Split,
    task_id: int,
    env: str = "household",
    seed: int = 0,
) -> EpisodeSummary:
    """Play one task to the end with ``policy``; the session is closed afterwards."""
    agent = ReferenceAgent(policy, random.Random(seed * 1_000_003 + task_id))
    last = await play_episode(client, Task(env, split, task_id, seed=seed), agent)
    return EpisodeSummary(task_id, agent.task_type, last.won, last.turn)


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
        lambda t: play_reference(client, policy, split, t, env, seed),
        task_ids,
        concurrency,
        f"{policy} on {split}",
        progress,
    )


def success_rate(episodes: list[EpisodeSummary]) -> float:
    return sum(e.won for e in episodes) / max(1, len(episodes))
