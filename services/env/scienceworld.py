"""ScienceWorld (AllenAI's text science simulator, on its bundled JVM) behind the Episode interface.

Two families:
- "scienceworld": no simplification, the benchmark as published;
- "scienceworld-easy": ScienceWorld's "easy" simplifications (teleport actions, open
  doors and containers, self-watering flower pots, no electrical actions where a task
  allows it), the setting most LLM-agent papers report.

Splits are ScienceWorld's own variation splits: its train variations are our train,
dev is valid_seen, test is valid_unseen. Task ids enumerate (task name, variation)
pairs round-robin over the 30 task names (sorted), one variation rank at a time: ids
0..29 are the first variation of every task in the split, 30..59 the second, and so
on, so the first n ids of a split already span the task types. The variation counts
are ScienceWorld 1.2.3's (7,207 variations; a test checks them against the JVM); the
table saves starting a JVM and loading 30 tasks just to answer ``splits()``.

Each episode owns one JVM (about 0.9 GB resident, ~2 s to start), started by
``make()`` and shut down by ``close()``; a JVM that dies under an episode turns the
next call into ``EpisodeCrashed`` (see ``jvm_guard``), which the service reports and
answers by dropping the session.

Observations are the engine's own text (the reset observation is its "look around").
Score: ScienceWorld's 0..100 score / 100, clipped at 0; a score of -100 (the task
failed) ends the episode. Won: the task completed with score 100.

Expert: the gold action sequence generated at load time, followed while the agent
follows it. Once the agent deviates the expert answers None (and ``expert_steps_left``
None): ScienceWorld has no planner that starts from an arbitrary state, and every
action lets simulated time pass (water heats, plants grow), so no deviation can be
assumed harmless to the gold path.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Any

from services.env.base import EnvironmentFamily, Episode, EpisodeCrashed, StepOutcome, TaskSpec
from services.env.gold_path import GoldPath

if TYPE_CHECKING:
    from scienceworld import ScienceWorldEnv

# ScienceWorld's split name for each of ours.
SPLITS = {"train": "train", "valid_seen": "dev", "valid_unseen": "test"}
# task name -> number of (train, dev, test) variations in scienceworld 1.2.3. Within a
# task the splits are consecutive ranges of variation indices: train first, then dev,
# then test (checked against the JVM by tests/env/test_scienceworld.py).
VARIATIONS: dict[str, tuple[int, int, int]] = {
    "boil": (14, 7, 9),
    "change-the-state-of-matter-of": (14, 7, 9),
    "chemistry-mix": (16, 8, 8),
    "chemistry-mix-paint-secondary-color": (18, 9, 9),
    "chemistry-mix-paint-tertiary-color": (18, 9, 9),
    "find-animal": (150, 75, 75),
    "find-living-thing": (150, 75, 75),
    "find-non-living-thing": (150, 75, 75),
    "find-plant": (150, 75, 75),
    "freeze": (14, 7, 9),
    "grow-fruit": (62, 31, 33),
    "grow-plant": (62, 31, 33),
    "identify-life-stages-1": (6, 3, 5),
    "identify-life-stages-2": (4, 2, 4),
    "inclined-plane-determine-angle": (84, 42, 42),
    "inclined-plane-friction-named-surfaces": (692, 346, 348),
    "inclined-plane-friction-unnamed-surfaces": (80, 40, 42),
    "lifespan-longest-lived": (62, 31, 32),
    "lifespan-longest-lived-then-shortest-lived": (62, 31, 32),
    "lifespan-shortest-lived": (62, 31, 32),
    "measure-melting-point-known-substance": (218, 109, 109),
    "measure-melting-point-unknown-substance": (150, 75, 75),
    "melt": (14, 7, 9),
    "mendelian-genetics-known-plant": (60, 30, 30),
    "mendelian-genetics-unknown-plant": (240, 120, 120),
    "power-component": (10, 5, 5),
    "power-component-renewable-vs-nonrenewable-energy": (10, 5, 5),
    "test-conductivity": (450, 225, 225),
    "test-conductivity-of-unknown-substances": (300, 150, 150),
    "use-thermometer": (270, 135, 135),
}
MIN_TURNS = 50
# The session layer ends episodes at max_turns. The wrapper's step limit must not end
# them first (steps go to the server directly, but keep it out of the way regardless).
ENGINE_STEP_LIMIT = 100_000


def split_variations(task_name: str, split: str) -> range:
    """The variation indices of ``task_name`` in our ``split`` (KeyError if unknown)."""
    n_train, n_dev, n_test = VARIATIONS[task_name]
    starts = {"train": (0, n_train), "dev": (n_train, n_dev), "test": (n_train + n_dev, n_test)}
    start, count = starts[SPLITS[split]]
    return range(start, start + count)


@cache
def split_tasks(split: str) -> tuple[tuple[str, int], ...]:
    """Every (task name, variation) of ``split`` in task-id order: round-robin over the
    sorted task names, one variation rank at a time."""
    per_task = {name: split_variations(name, split) for name in sorted(VARIATIONS)}
    deepest = max(len(variations) for variations in per_task.values())
    return tuple(
        (name, variations[rank])
        for rank in range(deepest)
        for name, variations in per_task.items()
        if rank < len(variations)
    )


@contextmanager
def jvm_guard(process: subprocess.Popen, engine: str) -> Iterator[None]:
    """Turn a call on a dead JVM into EpisodeCrashed, naming the engine, pid and exit code.

    py4j itself only says "Answer from Java side is empty" or "connection refused" (and
    logs a traceback per retry), so the process is checked before each call, and after
    a py4j error it gets a moment to be reaped before the error is classified.
    """
    ensure_alive(process, engine)
    try:
        yield
    except Exception as exc:
        from py4j.protocol import Py4JError, Py4JJavaError

        # A Java exception comes from a live JVM; any other py4j error may be its death
        # seen before the process is reaped (a reset connection, an empty answer).
        if isinstance(exc, Py4JError) and not isinstance(exc, Py4JJavaError):
            try:
                process.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                pass
        if process.poll() is None:
            raise
        raise EpisodeCrashed(_death_notice(process, engine)) from exc


def ensure_alive(process: subprocess.Popen, engine: str) -> None:
    """Raise EpisodeCrashed if the JVM behind an episode has exited."""
    if process.poll() is not None:
        raise EpisodeCrashed(_death_notice(process, engine))


def _death_notice(process: subprocess.Popen, engine: str) -> str:
    return f"{engine}'s JVM (pid {process.pid}) is gone: it exited with code {process.returncode}."


def shut_down_jvm(close: Any, process: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Close a py4j engine (``close``: its close method) and make sure its JVM exits."""
    try:
        if process.poll() is None:
            close()
    finally:
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ScienceWorldEpisode(Episode):
    """One ScienceWorld task variation on a JVM of its own."""

    def __init__(self, split: str, task_id: int, simplification: str, family: str) -> None:
        from scienceworld import ScienceWorldEnv

        task_name, variation = split_tasks(split)[task_id]
        self.env: ScienceWorldEnv = ScienceWorldEnv("", envStepLimit=ENGINE_STEP_LIMIT)
        self.process: subprocess.Popen = self.env._gateway.java_process
        try:
            with jvm_guard(self.process, "ScienceWorld"):
                self.env.load(task_name, variation, simplification, generateGoldPath=True)
                self.gold = [str(action) for action in self.env.get_gold_action_sequence()]
                goal = str(self.env.get_task_description())
        except BaseException:
            self.close()
            raise
        self.task = TaskSpec(
            env=family,
            split=split,
            task_id=task_id,
            task_type=task_name,
            goal=goal,
            max_turns=max(MIN_TURNS, 2 * len(self.gold)),
            extra={
                "variation": variation,
                "simplification": simplification,
                "gold_length": len(self.gold),
            },
        )
        self.gold_path = GoldPath(self.gold)
        self._won = self._done = False

    def _observe(self, observation: str) -> StepOutcome:
        """Read score, completion and the valid actions after a reset or a step.

        The JSON form of the valid actions crosses py4j as one string; the wrapper's
        ``step`` fetches them as a Java list (one round trip per element) plus three
        texts we don't need, which about doubles the time of a step.
        """
        server = self.env.server
        score = int(round(100 * server.getScore()))
        completed = bool(server.getCompleted())
        self._won = completed and score >= 100
        self._done = completed or score < 0  # as the wrapper: -100 means the task failed
        valid = json.loads(server.getValidActionObjectCombinationsJSON())["validActions"]
        return StepOutcome(
            observation=str(observation),
            done=self._done,
            won=self._won,
            score=max(score, 0) / 100,
            admissible_actions=sorted({entry["action"] for entry in valid}),
        )

    def reset(self) -> StepOutcome:
        with jvm_guard(self.process, "ScienceWorld"):
            # As ScienceWorldEnv.reset: back to the first move, then "look around".
            self.env.server.reset()
            self.gold_path.reset()
            return self._observe(self.env.server.step("look around"))

    def step(self, action: str) -> StepOutcome:
        self.gold_path.record(action)
        with jvm_guard(self.process, "ScienceWorld"):
            return self._observe(self.env.server.step(action.strip()))

    def admissible_actions(self) -> list[str]:
        with jvm_guard(self.process, "ScienceWorld"):
            valid = json.loads(self.env.server.getValidActionObjectCombinationsJSON())
        return sorted({entry["action"] for entry in valid["validActions"]})

    def expert_action(self) -> str | None:
        ensure_alive(self.process, "ScienceWorld")  # a dead JVM says so here too
        return self.gold_path.next_action(self._done)

    def expert_steps_left(self) -> int | None:
        return self.gold_path.steps_left(self._won, self._done)

    def close(self) -> None:
        shut_down_jvm(self.env.close, self.process)


class ScienceWorldEnvironment(EnvironmentFamily):
    """ScienceWorld's 30 tasks, no simplification; see the module docstring."""

    name = "scienceworld"
    simplification = ""
    blocking = True  # a JVM start, a gold path and every step take from 0.05 s to seconds

    def splits(self) -> dict[str, int]:
        return {split: len(split_tasks(split)) for split in SPLITS}

    def make(self, split: str, task_id: int, seed: int = 0) -> ScienceWorldEpisode:
        """The episode for (split, task_id); the seed is ignored (a variation is one world)."""
        if split not in SPLITS or not 0 <= task_id < len(split_tasks(split)):
            raise KeyError((split, task_id))
        return ScienceWorldEpisode(split, task_id, self.simplification, self.name)


class ScienceWorldEasyEnvironment(ScienceWorldEnvironment):
    """ScienceWorld with its "easy" simplifications."""

    name = "scienceworld-easy"
    simplification = "easy"
