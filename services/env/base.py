"""The one interface every text environment implements.

The env service, its sessions and its HTTP layer see only these types; an
environment knows nothing of sessions, HTTP or turn limits (the session layer
counts turns and ends an episode at ``max_turns``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: stable for a given (env, split, task_id)."""

    env: str
    split: str
    task_id: int
    task_type: str
    goal: str  # e.g. "put a clean apple in fridge."
    max_turns: int
    extra: dict[str, str | int | float] = field(default_factory=dict)


@dataclass(frozen=True)
class StepOutcome:
    """What the agent sees after reset or after one action."""

    observation: str
    done: bool
    won: bool
    score: float  # 0..1 progress where the environment reports it; won -> 1.0
    admissible_actions: list[str]


class EpisodeCrashed(RuntimeError):
    """The engine behind an episode died (its JVM or game process is gone).

    The episode cannot go on: the service answers 502 "environment_crashed" with this
    message and drops the session; other sessions are unaffected.
    """


class Episode(ABC):
    """One playable instance of a task. Not thread-safe; one caller at a time."""

    task: TaskSpec

    @abstractmethod
    def reset(self) -> StepOutcome:
        """Start (or restart) the episode and return the first observation."""

    @abstractmethod
    def step(self, action: str) -> StepOutcome:
        """Execute one action string; unknown or inapplicable actions are not errors."""

    @abstractmethod
    def admissible_actions(self) -> list[str]:
        """Every action that the grammar accepts in the current state."""

    @abstractmethod
    def expert_action(self) -> str | None:
        """The expert's next action from the current state; None once won."""

    def expert_steps_left(self) -> int | None:
        """How many steps the expert still needs from here (None: the env cannot tell)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release external resources (a JVM, a game process). Default: nothing."""


class EnvironmentFamily(ABC):
    """A named set of tasks split into train / valid_seen / valid_unseen."""

    name: str
    # True when a call may take long (a JVM, a game engine): the service then runs
    # episode calls in a worker thread instead of on its event loop.
    blocking: bool = False

    @abstractmethod
    def splits(self) -> dict[str, int]:
        """Number of tasks per split; task ids run from 0 to that number - 1."""

    @abstractmethod
    def make(self, split: str, task_id: int, seed: int = 0) -> Episode:
        """Build the episode for (split, task_id). Raise KeyError for unknown ones."""
