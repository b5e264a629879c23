"""Embedded household world: steps/s in process, and through the env service (batched step).

Both sides play the same random admissible policy on the same train tasks; the
service runs as its own process on loopback and is driven with one batched step
call for all sessions at a time. Prints the in-process rate (target >= 10,000
steps/s on one core) and, last, the service / in-process ratio (target >= 0.3).

Before that, the real third-party environments (ScienceWorld, TextWorld cooking,
TextWorldExpress) play the same policy in process for a bounded time each, and
their steps/s are printed next to the household world's; an environment whose
package is not installed is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import random
import statistics
import time

from client.env import EnvClient
from client.protocol import CreateSessionRequest
from services.env.household import HouseholdEnvironment
from services.env.registry import get_family
from trainer.stack import local_service


def in_process_rate(steps: int, seed: int = 0) -> float:
    """Steps/s of reset/step/admissible_actions called directly, one episode after another."""
    family = HouseholdEnvironment()
    rng = random.Random(seed)
    n_train = family.splits()["train"]
    done_steps = 0
    start = time.perf_counter()
    task = 0
    while done_steps < steps:
        episode = family.make("train", task % n_train)
        outcome = episode.reset()
        for _ in range(episode.task.max_turns):
            outcome = episode.step(rng.choice(outcome.admissible_actions))
            done_steps += 1
            if outcome.done or done_steps >= steps:
                break
        task += 1
    return done_steps / (time.perf_counter() - start)


# family -> the package it needs; each plays one train task (a JVM or a game per
# episode is costly to start, so a finished episode is reset rather than replaced).
REAL_ENVIRONMENTS = {
    "scienceworld": "scienceworld",
    "alfworld-generated": "alfworld",
    "textworld-cooking": "textworld",
    "twx-cookingworld": "textworld_express",
    "twx-twc": "textworld_express",
}


def real_environment_rate(name: str, seconds: float, max_steps: int, seed: int = 0) -> str:
    """Steps/s of one real environment in process, random admissible policy, bounded in time
    and count; the episode's start (JVM, game generation) is timed apart."""
    rng = random.Random(seed)
    start = time.perf_counter()
    episode = get_family(name).make("train", 0)
    try:
        outcome = episode.reset()
        started_s = time.perf_counter() - start
        steps, start = 0, time.perf_counter()
        while steps < max_steps and time.perf_counter() - start < seconds:
            outcome = episode.step(rng.choice(outcome.admissible_actions))
            steps += 1
            if outcome.done:
                outcome = episode.reset()
        rate = steps / (time.perf_counter() - start)
    finally:
        episode.close()
    return f"{rate:,.1f} steps/s ({steps} steps; episode start {started_s:.1f} s)"


async def service_rate(url: str, sessions: int, steps: int, lanes: int = 2, seed: int = 0) -> float:
    """Steps/s through the service with batched calls, as a trainer drives it.

    ``lanes`` loops run side by side, each with its share of the sessions: one
    batched step call for all of them, then one call that closes the finished
    episodes and one that opens new tasks in their place. While the service
    steps one lane's batch, the client reads another's answer.
    """
    rng = random.Random(seed)
    async with EnvClient(url) as client:
        n_train = (await client.environments()).environments[0].splits["train"]
        next_task = 0
        done_steps = 0

        async def open_sessions(live: dict[str, list[str]], count: int) -> None:
            nonlocal next_task
            requests = [
                CreateSessionRequest(task_id=(next_task + i) % n_train) for i in range(count)
            ]
            next_task += count
            for item in await client.create_sessions(requests):
                assert item.result is not None, item.error
                live[item.result.session_id] = item.result.first.admissible_actions

        async def lane(live: dict[str, list[str]]) -> None:
            nonlocal done_steps
            while done_steps < steps:
                items = await client.step_many({sid: rng.choice(a) for sid, a in live.items()})
                done_steps += len(items)
                finished = []
                for item in items:
                    assert item.result is not None, item.error
                    if item.result.done:
                        finished.append(item.session_id)
                        del live[item.session_id]
                    else:
                        live[item.session_id] = item.result.admissible_actions
                if finished:
                    await client.close_sessions(finished)
                    await open_sessions(live, len(finished))

        pools: list[dict[str, list[str]]] = [{} for _ in range(lanes)]
        for pool in pools:
            await open_sessions(pool, sessions // lanes)
        start = time.perf_counter()
        await asyncio.gather(*(lane(pool) for pool in pools))
        elapsed = time.perf_counter() - start
        await client.close_sessions([sid for pool in pools for sid in pool])
    return done_steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30_000, help="steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements each")
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--lanes", type=int, default=4)
    parser.add_argument(
        "--real-seconds", type=float, default=10.0, help="per real environment (0: skip them)"
    )
    args = parser.parse_args()

    if args.real_seconds > 0:
        print(f"in process, random admissible policy, train task 0, <= {args.real_seconds:g} s:")
        in_process_rate(2_000)  # warm up
        print(f"  household: {in_process_rate(20_000):,.0f} steps/s")
        for name, package in REAL_ENVIRONMENTS.items():
            if importlib.util.find_spec(package) is None:
                print(f"  {name}: skipped ({package} is not installed)")
                continue
            print(f"  {name}: {real_environment_rate(name, args.real_seconds, 2_000)}")

    print(f"cores: {os.cpu_count()}; random admissible policy on household/train")
    print(
        f"service: {args.sessions} sessions in {args.lanes} lanes of batched step calls, "
        "in its own process on loopback"
    )
    local_rates, remote_rates = [], []
    with local_service("env", "services.env", env={"SAGE_ENV_LOG_LEVEL": "warning"}) as env:
        in_process_rate(2_000)  # warm up both sides
        asyncio.run(service_rate(env.url, args.sessions, 2_000, args.lanes))
        # Alternate the two so that both see the same machine noise.
        for round_ in range(args.rounds):
            local_rates.append(in_process_rate(args.steps))
            remote_rates.append(
                asyncio.run(service_rate(env.url, args.sessions, args.steps, args.lanes))
            )
            print(
                f"round {round_ + 1}: in process {local_rates[-1]:,.0f} steps/s, "
                f"service {remote_rates[-1]:,.0f} steps/s ({args.steps:,} steps each)"
            )
    local, remote = statistics.median(local_rates), statistics.median(remote_rates)
    print(f"in process (median): {local:,.0f} steps/s on one core (target >= 10,000)")
    print(f"service (median): {remote:,.0f} steps/s")
    ratios = [r / p for r, p in zip(remote_rates, local_rates, strict=True)]
    print(f"per-round ratios: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"env_throughput (service / in process, target >= 0.3): {remote / local:.2f}")


if __name__ == "__main__":
    main()
