"""Rollout overlap: collecting and scoring 64 episodes with the trainer's async pipeline,
over doing it one episode at a time.

The env service and a teacher service (the random "tiny" Llama on the household
tokenizer) run as their own processes on loopback; the student is the same tiny
model in this process, sampling at temperature 1 for up to ``--turns`` turns.

- pipeline: ``Trainer.collect``'s way: every episode in flight at once, the
  student's generation batched across the episodes waiting for it, each finished
  episode sent to the teacher's fused call while the others still act;
- one at a time: play an episode (generation batch of one), then score and judge
  it, then the next.

Both play the same 64 train tasks with the same seeds, alternating for a few
rounds. Prints, last, the ratio pipeline / one-at-a-time of wall time (target <= 0.5).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch
from _models import QUIET_ENV, tiny_teacher
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.env import EnvClient
from client.prompts import ChatRenderer
from client.teacher import TeacherClient
from trainer.config import TrainConfig
from trainer.episodes import play_many
from trainer.models import AgentSpec
from trainer.rollout import BatchedGenerator, run_episode
from trainer.stack import local_service
from trainer.supervision import Supervisor


async def collect(
    env_url: str,
    teacher_url: str,
    model,
    tokenizer,
    tasks: list[int],
    turns: int,
    pipeline: bool,
) -> float:
    config = TrainConfig(student="bench", teacher_urls=[teacher_url], env_url=env_url)
    renderer = ChatRenderer(tokenizer)
    start = time.perf_counter()
    async with (
        EnvClient(env_url, max_connections=64) as env,
        TeacherClient(teacher_url) as teacher,
        BatchedGenerator(model, tokenizer, max_new_tokens=12, temperature=1.0, seed=0) as generator,
    ):
        supervisor = Supervisor([teacher], config, tokenizer)

        async def one(task_id: int) -> object:
            record = await run_episode(
                env, generator, renderer, "train", task_id, AgentSpec(max_turns=turns)
            )
            return await supervisor.supervise(record)

        if pipeline:
            await play_many(one, tasks, concurrency=64, desc="pipeline", progress=False)
        else:
            for task_id in tasks:
                await one(task_id)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = tiny_teacher(size="tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tasks = list(range(args.episodes))
    env_vars = {**QUIET_ENV, "SAGE_ENV_LOG_LEVEL": "warning"}
    with (
        local_service("env", "services.env", env=env_vars) as env,
        local_service(
            "teacher", "services.teacher", ["--model", str(path)], env=env_vars
        ) as teacher,
    ):
        pipeline_s, serial_s = [], []
        for round_ in range(args.rounds):
            pipeline_s.append(
                asyncio.run(
                    collect(env.url, teacher.url, model, tokenizer, tasks, args.turns, True)
                )
            )
            serial_s.append(
                asyncio.run(
                    collect(env.url, teacher.url, model, tokenizer, tasks, args.turns, False)
                )
            )
            print(
                f"round {round_}: pipeline {pipeline_s[-1]:.1f}s, one at a time {serial_s[-1]:.1f}s"
            )
    pipeline, serial = statistics.median(pipeline_s), statistics.median(serial_s)
    print(f"{args.episodes} episodes of {args.turns} turns, collected and scored")
    print(f"pipeline: {pipeline:.1f}s (median), one at a time: {serial:.1f}s (median)")
    print(f"pipeline / one at a time: {pipeline / serial:.2f}  (target <= 0.5)")


if __name__ == "__main__":
    main()
