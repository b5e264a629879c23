"""The real ALFWorld text engine for one game: TextWorld's PddlEnv under ALFWorld's wrappers.

The stack is the one ``alfworld-generate`` and ALFWorld's own training environment
build: ``PddlEnv`` (fast-downward grounds the PDDL, TextWorld renders alfred.twl2)
wrapped by ``AlfredDemangler`` (THOR ids -> "apple 1"), ``AlfredInfos`` (the game file in
the infos) and ``AlfredExpert`` with the handcoded expert (its next action in
``infos['extra.expert_plan']``, recomputed after every step).

What this module adds, each because many sessions share the engine in one process:

- One lock around every call into the engine. TextWorld parses grammar templates and
  conditions with module-level tatsu parsers, which keep their parse state on the
  parser object; fast-downward's ``pddl2sas`` sets module-level translator options,
  swaps ``sys.stdout`` and overwrites ``sys.argv`` while it runs. None of it is
  thread-safe, and the work is pure Python under the GIL anyway, so serialising costs
  little. ``sys.argv`` is put back after each call.
- Memoised PDDL translation and template parsing (same results, computed once):
  TextWorld translates a problem twice on load and twice again on every reset (one
  reset of a large kitchen took 4 s), and re-parses every command template on every
  step (half of a step's time).
- A pool of fast-downward library copies. TextWorld loads a private copy of
  libdownward.so (33 MB) per environment and never unloads it; unloading it
  (``fast_downward.close_lib``) makes the interpreter crash at exit. A closed game
  hands its copy back (``cleanup()`` frees the task), and the next game reuses it, so
  a long-running service holds as many copies as it ever had games open at once.
- The handcoded expert breaks ties with the ``random`` module; its module's ``random``
  is replaced by a stand-in that draws from the current game's own seeded generator,
  so an episode's expert actions depend only on its game, seed and moves.
- The expert may give up (it raises when out of subgoals or past 200 steps): the game
  then has no expert action (an empty plan) instead of failing; and it is told its
  placements in the spelling it tracks (see ``_SafeAlfredExpert``).
"""

from __future__ import annotations

import copy
import functools
import random
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fast_downward
import textworld
from alfworld.agents.environment.alfred_tw_env import (
    AlfredDemangler,
    AlfredExpert,
    AlfredExpertType,
    AlfredInfos,
)
from alfworld.agents.expert import HandCodedAgentFailed, HandCodedAgentTimeout, handcoded_expert
from textworld.envs import PddlEnv
from textworld.envs.pddl import logic as pddl_logic
from textworld.envs.pddl import textgen

_ENGINE_LOCK = threading.RLock()


@contextmanager
def _engine() -> Iterator[None]:
    """One call into the engine at a time, with the process's argv left as it was."""
    with _ENGINE_LOCK:
        argv = sys.argv
        try:
            yield
        finally:
            sys.argv = argv


# ----------------------------------------------------------------------- memoisation

_translate = functools.lru_cache(maxsize=32)(fast_downward.pddl2sas)


class _MemoisedDownward(types.ModuleType):
    """fast_downward as TextWorld's PDDL state sees it: translations are remembered.

    The translated task is only read by PddlState, so sharing it between states is safe.
    """

    pddl2sas = staticmethod(_translate)

    def __getattr__(self, name: str) -> Any:
        return getattr(fast_downward, name)


pddl_logic.fast_downward = _MemoisedDownward("fast_downward")

_parse_template = functools.lru_cache(maxsize=8192)(textgen._parse_and_convert)


def _parse_template_copy(*args: Any, **kwargs: Any) -> Any:
    # Callers set each parsed symbol's context: hand out a copy, never the cached one.
    return copy.deepcopy(_parse_template(*args, **kwargs))


textgen._parse_and_convert = _parse_template_copy


# ----------------------------------------------------------------------- library pool

_IDLE_LIBRARIES: list[Any] = []


class _PooledPddlEnv(PddlEnv):
    """PddlEnv that borrows a fast-downward library copy from the pool (see the module doc)."""

    def __init__(self, infos: textworld.EnvInfos) -> None:
        textworld.Environment.__init__(self, infos)
        self.downward_lib = _IDLE_LIBRARIES.pop() if _IDLE_LIBRARIES else fast_downward.load_lib()

    def close(self) -> None:
        lib, self.downward_lib = self.downward_lib, None
        if lib is not None:
            lib.cleanup()
            _IDLE_LIBRARIES.append(lib)


# ----------------------------------------------------------------------- the expert


class _EpisodeRandom:
    """Stands in for the ``random`` module inside ALFWorld's handcoded expert."""

    def __init__(self) -> None:
        self.rng = random.Random(0)

    def choice(self, seq: Any) -> Any:
        return self.rng.choice(seq)


_EXPERT_RANDOM = _EpisodeRandom()
handcoded_expert.random = _EXPERT_RANDOM  # the module only ever calls random.choice


class _SafeAlfredExpert(AlfredExpert):
    """AlfredExpert whose expert may give up (its plan is then empty; the game goes on)
    and sees its own placements.

    ALFWorld 0.4 renamed "put X in/on Y" to "move X to Y" (alfworld PR #94), but the
    handcoded expert of 0.4.2 still recognises a placement by "put" in the last command
    (update_state_tracking; reported upstream in alfworld PR #114). Unfixed, it believes
    it still holds what it has put down and never wins a pick_two_obj_and_place game.
    So the expert is told the last command in the spelling it tracks.
    """

    def _gather_infos(self) -> None:
        if self.prev_command.startswith("move "):
            obj, _, receptacle = self.prev_command.removeprefix("move ").partition(" to ")
            self.prev_command = f"put {obj} in/on {receptacle}"
        try:
            super()._gather_infos()
        except HandCodedAgentFailed:
            self.state["extra.expert_plan"] = []
        except Exception as exc:  # AlfredExpert re-raises the timeout as Exception("Timeout")
            if not isinstance(exc.__context__, HandCodedAgentTimeout):
                raise
            self.state["extra.expert_plan"] = []


# ----------------------------------------------------------------------- one game


class AlfredGame:
    """One loaded game; reset and step return TextWorld game states (dict-like infos).

    The states carry 'feedback', 'admissible_commands', 'won' and 'extra.expert_plan'.
    """

    def __init__(self, game_file: Path, seed: int = 0) -> None:
        self.game_file = game_file
        self.seed = seed
        self._rng = random.Random(seed)
        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
        with _engine():
            env: Any = _PooledPddlEnv(infos)
            env = AlfredDemangler(env, shuffle=False)
            env = AlfredInfos(env)
            self.env = _SafeAlfredExpert(env, expert_type=AlfredExpertType.HANDCODED)
            try:
                self.env.load(str(game_file))
            except BaseException:
                self.env.close()
                raise

    def reset(self) -> Any:
        self._rng = random.Random(self.seed)
        with _engine():
            _EXPERT_RANDOM.rng = self._rng
            return self.env.reset()

    def step(self, command: str) -> Any:
        with _engine():
            _EXPERT_RANDOM.rng = self._rng
            state, _, _ = self.env.step(command)
            return state

    def close(self) -> None:
        with _engine():
            self.env.close()


def play_expert(game_file: Path, max_steps: int, seed: int = 0) -> list[str] | None:
    """The handcoded expert's moves if it wins the game within ``max_steps``, else None."""
    game = AlfredGame(game_file, seed)
    try:
        state = game.reset()
        moves: list[str] = []
        while not state["won"] and len(moves) < max_steps:
            plan = state["extra.expert_plan"]
            if not plan:
                return None
            moves.append(plan[0])
            state = game.step(plan[0])
        return moves if state["won"] else None
    finally:
        game.close()
