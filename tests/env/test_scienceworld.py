"""ScienceWorld behind the env service: real JVMs, real uvicorn on loopback, the client.

One service serves the module's tests (ScienceWorld steps cost ~0.1 s and every
session starts a JVM, so episodes run a few at a time side by side).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("scienceworld", reason="ScienceWorld is not installed (extra: scienceworld)")
psutil = pytest.importorskip("psutil", reason="psutil finds the JVM to kill")

from client.env import EnvClient, RetryPolicy, ServiceCallError  # noqa: E402
from services.env.app import create_app  # noqa: E402
from services.env.scienceworld import SPLITS, VARIATIONS, split_tasks  # noqa: E402
from services.env.settings import EnvSettings  # noqa: E402
from services.http import running_server  # noqa: E402

ENV = "scienceworld"  # no simplification: "easy" makes none of these gold paths shorter
# (task name, train variation) with short gold paths: boil, find-animal and grow-plant
# as asked, five more task types beside them (gold lengths 31, 6, 63, 16, 9, 7, 19, 16).
EXPERT_TASKS = [
    ("boil", 1),
    ("find-animal", 3),
    ("grow-plant", 0),
    ("use-thermometer", 3),
    ("power-component", 5),
    ("chemistry-mix-paint-secondary-color", 1),
    ("melt", 4),
    ("chemistry-mix", 2),
]
NO_RETRY = RetryPolicy(attempts=1)


def task_id_of(task_name: str, variation: int, split: str = "train") -> int:
    return split_tasks(split).index((task_name, variation))


def java_children() -> set[int]:
    """Pids of the JVMs this test process has started (the service runs in process)."""
    me = psutil.Process()
    return {p.pid for p in me.children(recursive=True) if "java" in p.name().lower()}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with running_server(create_app(EnvSettings(environments=ENV))) as base_url:
        yield base_url


def test_split_table_matches_the_engine() -> None:
    from scienceworld import ScienceWorldEnv

    engine = ScienceWorldEnv("", envStepLimit=100)
    try:
        assert sorted(engine.get_task_names()) == sorted(VARIATIONS)
        for task_name in VARIATIONS:
            engine.load(task_name, 0, "")
            for split, theirs in SPLITS.items():
                ours = [v for name, v in split_tasks(split) if name == task_name]
                assert ours == getattr(engine, f"get_variations_{theirs}")(), (task_name, split)
    finally:
        engine.close()
    assert sum(len(split_tasks(split)) for split in SPLITS) == 7207


def test_task_ids_run_round_robin_over_the_thirty_task_types() -> None:
    first = split_tasks("valid_unseen")[:30]
    assert [name for name, _ in first] == sorted(VARIATIONS)
    # boil's test variations are 21..29 (14 train, 7 dev before them).
    assert first[0] == ("boil", 21)
    assert split_tasks("valid_unseen")[30] == ("boil", 22)


async def test_expert_wins_eight_task_types(url: str) -> None:
    slots = asyncio.Semaphore(3)  # at most three JVMs busy at once on two cores

    async def play(client: EnvClient, task_name: str, variation: int) -> tuple[str, bool]:
        async with slots, client.open_session(ENV, "train", task_id_of(task_name, variation)) as s:
            assert s.task.task_type == task_name and s.task.extra["variation"] == variation
            assert s.first.admissible_actions and not s.first.done
            result = s.first
            while not result.done:
                action = await client.expert_action(s.session_id)
                assert action is not None, f"{task_name}: the expert stopped before the end"
                result = await client.step(s.session_id, action)
            assert await client.expert_action(s.session_id) is None
            return task_name, result.won and result.score == 1.0 and not result.truncated

    async with EnvClient(url) as client:
        outcomes = await asyncio.gather(*(play(client, *task) for task in EXPERT_TASKS))
    assert dict(outcomes) == {name: True for name, _ in EXPERT_TASKS}


async def test_the_expert_follows_the_gold_path_and_gives_up_off_it(url: str) -> None:
    async with EnvClient(url) as client:
        async with client.open_session(ENV, "train", task_id_of("find-animal", 3)) as s:
            gold_length = s.task.extra["gold_length"]
            advice = await client.expert(s.session_id, steps_left=True)
            assert advice.action is not None and advice.steps_left == gold_length
            assert await client.admissible_actions(s.session_id) == s.first.admissible_actions
            await client.step(s.session_id, advice.action)
            after = await client.expert(s.session_id, steps_left=True)
            assert after.steps_left == gold_length - 1
            assert "inventory" != after.action
            await client.step(s.session_id, "inventory")  # not the gold action: off the path
            lost = await client.expert(s.session_id, steps_left=True)
            assert lost.action is None and lost.steps_left is None


async def test_a_killed_jvm_fails_its_session_only(url: str) -> None:
    async with EnvClient(url, retry=NO_RETRY) as client:
        before = java_children()
        doomed = await client.create_session(ENV, "train", task_id_of("find-animal", 3))
        (doomed_jvm,) = java_children() - before
        other = await client.create_session(ENV, "train", task_id_of("power-component", 5))
        (other_jvm,) = java_children() - before - {doomed_jvm}

        os.kill(doomed_jvm, signal.SIGKILL)
        with pytest.raises(ServiceCallError) as caught:
            await client.step(doomed.session_id, "look around")
        assert caught.value.status == 502
        assert caught.value.error.code == "environment_crashed"
        assert f"JVM (pid {doomed_jvm}) is gone" in caught.value.error.message
        with pytest.raises(ServiceCallError) as gone:
            await client.session(doomed.session_id)
        assert gone.value.status == 404

        # The other session plays on, and a new one opens.
        assert not (await client.step(other.session_id, "look around")).done
        async with client.open_session(ENV, "valid_seen", 0) as fresh:
            assert fresh.task.task_type == "boil"
            assert not (await client.step(fresh.session_id, "look around")).done

        # Closing a session shuts its JVM down.
        await client.close_session(other.session_id)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(other_jvm) and psutil.Process(other_jvm).status() != "zombie":
            assert time.monotonic() < deadline, "the closed session's JVM is still running"
            await asyncio.sleep(0.1)
