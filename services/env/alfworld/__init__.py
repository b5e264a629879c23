"""ALFWorld's real text engine behind the Episode interface: its own games, or generated ones.

Two families, one engine (engine.py: TextWorld's PddlEnv under ALFWorld's
AlfredDemangler, AlfredInfos and AlfredExpert wrappers with the handcoded expert):

- "alfworld": ALFWorld's own games, from ``$ALFWORLD_DATA`` (ALFWorld's default
  ~/.cache/alfworld when unset), laid out as ``alfworld-download`` leaves them:
  ``json_2.1.1/{train,valid_seen,valid_unseen}/<task>/trial_*/{game.tw-pddl,
  traj_data.json}`` and ``logic/``. Task ids enumerate a split's game files in sorted
  path order, keeping the games ALFWorld's own AlfredTWEnv keeps (its six task types,
  no movable-receptacle or sliced tasks, marked solvable).
- "alfworld-generated": games this repository generates offline from the floor plans
  and PDDL in the alfworld wheel (generate.py), in the same layout, under
  ``$SAGE_OPD_ALFWORLD_GENERATED_CACHE`` (default ~/.cache/sage-opd/alfworld-generated).
  A game is generated, and checked winnable by the expert, the first time its task is
  made. Results on these games are reported as "alfworld-generated", never as ALFWorld.

Per step: the observation is the engine's feedback (the first one is ALFWorld's
"-= Welcome to TextWorld, ALFRED! =-" intro ending in "Your task is to: ..."), the
admissible actions are the game's ``admissible_commands``, won is ``infos['won']``
(sticky once reached; score 1.0 then, else 0.0), and the expert action is the head of
``infos['extra.expert_plan']`` (None once won, or once the expert has given up).
Actions are lower-cased and their spaces collapsed before they reach the engine. The
seed of make() seeds only the expert's tie-breaks; the game is the same for every seed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.env.alfworld.generate import (
    MAX_TURNS,
    SPLIT_SIZES,
    TASK_TYPES,
    default_cache_dir,
    ensure_game,
)
from services.env.base import EnvironmentFamily, Episode, StepOutcome, TaskSpec
from services.env.household.world import normalise

if TYPE_CHECKING:
    from services.env.alfworld.engine import AlfredGame

__all__ = ["AlfworldEnvironment", "AlfworldEpisode", "AlfworldGeneratedEnvironment"]

SPLITS: tuple[str, ...] = tuple(SPLIT_SIZES)
_GOAL = re.compile(r"Your task is to: (.*?)\"")


def alfworld_data_dir() -> Path:
    """$ALFWORLD_DATA, or ALFWorld's own default (~/.cache/alfworld)."""
    configured = os.environ.get("ALFWORLD_DATA")
    return Path(configured) if configured else Path.home() / ".cache" / "alfworld"


def playable_games(root: Path, split: str) -> list[Path]:
    """The game files of a split that ALFWorld's AlfredTWEnv plays, in sorted path order."""
    games = []
    for game_file in sorted((root / "json_2.1.1" / split).glob("*/*/game.tw-pddl")):
        traj_file = game_file.with_name("traj_data.json")
        folder = game_file.parent.parent.name  # e.g. pick_heat_then_place_in_recep-Egg-None-...
        if "movable" in folder or "Sliced" in folder or not traj_file.exists():
            continue
        if json.loads(traj_file.read_text())["task_type"] not in TASK_TYPES:
            continue
        if json.loads(game_file.read_text()).get("solvable"):
            games.append(game_file)
    return games


def task_spec(env: str, split: str, task_id: int, game_file: Path, root: Path) -> TaskSpec:
    """A task's metadata from its files: type and targets from traj_data.json, the goal
    from the game's grammar (the sentence its first observation ends with)."""
    traj = json.loads(game_file.with_name("traj_data.json").read_text())
    goal = _GOAL.search(json.loads(game_file.read_text())["grammar"])
    params = traj.get("pddl_params", {})
    return TaskSpec(
        env=env,
        split=split,
        task_id=task_id,
        task_type=traj["task_type"],
        goal=goal.group(1) if goal else "",
        max_turns=MAX_TURNS,
        extra={
            "game": str(game_file.parent.relative_to(root)),
            "floor_plan": str(traj.get("scene", {}).get("floor_plan", "")),
            "object_target": str(params.get("object_target", "")),
            "parent_target": str(params.get("parent_target", "")),
            "toggle_target": str(params.get("toggle_target", "")),
        },
    )


class AlfworldEpisode(Episode):
    """One ALFWorld game in play; reset() restarts it from its initial state."""

    def __init__(self, task: TaskSpec, game_file: Path, seed: int = 0) -> None:
        from services.env.alfworld.engine import AlfredGame

        self.task = task
        self.game: AlfredGame = AlfredGame(game_file, seed)
        self._state: Any = None
        self._won = False

    def _outcome(self, state: Any) -> StepOutcome:
        self._state = state
        self._won = self._won or bool(state["won"])
        return StepOutcome(
            observation=state["feedback"],
            done=self._won,
            won=self._won,
            score=1.0 if self._won else 0.0,
            admissible_actions=list(state["admissible_commands"]),
        )

    def reset(self) -> StepOutcome:
        self._won = False
        return self._outcome(self.game.reset())

    def step(self, action: str) -> StepOutcome:
        if self._state is None:
            self.reset()
        return self._outcome(self.game.step(normalise(action)))

    def admissible_actions(self) -> list[str]:
        if self._state is None:
            self.reset()
        return list(self._state["admissible_commands"])

    def expert_action(self) -> str | None:
        if self._state is None:
            self.reset()
        plan = self._state["extra.expert_plan"]
        return None if self._won or not plan else plan[0]

    def close(self) -> None:
        self.game.close()


class AlfworldEnvironment(EnvironmentFamily):
    """ALFWorld's own games from $ALFWORLD_DATA; fails to build when it holds none."""

    name = "alfworld"
    blocking = True  # loading a game grounds its PDDL (seconds); a step takes ~0.1 s

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or alfworld_data_dir()
        self.games = {split: playable_games(self.root, split) for split in SPLITS}
        if not any(self.games.values()):
            raise FileNotFoundError(
                f"no ALFWorld games under {self.root}/json_2.1.1/{{{','.join(SPLITS)}}}: "
                "set ALFWORLD_DATA to the folder `alfworld-download` fills, or serve "
                "'alfworld-generated' (games generated offline, reported under that name)"
            )

    def splits(self) -> dict[str, int]:
        return {split: len(games) for split, games in self.games.items()}

    def make(self, split: str, task_id: int, seed: int = 0) -> AlfworldEpisode:
        """The episode of the split's task_id-th game; KeyError for an unknown split or id."""
        games = self.games[split]
        if not 0 <= task_id < len(games):
            raise KeyError((split, task_id))
        game_file = games[task_id]
        spec = task_spec(self.name, split, task_id, game_file, self.root)
        return AlfworldEpisode(spec, game_file, seed)


class AlfworldGeneratedEnvironment(EnvironmentFamily):
    """ALFWorld-format games generated offline (generate.py), played by the real engine."""

    name = "alfworld-generated"
    blocking = True  # a task's first make() generates its game and plays the expert on it

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_cache_dir()

    def splits(self) -> dict[str, int]:
        return dict(SPLIT_SIZES)

    def make(self, split: str, task_id: int, seed: int = 0) -> AlfworldEpisode:
        """The episode of (split, task_id), generating its game on first use; KeyError for
        an unknown split or id."""
        if split not in SPLIT_SIZES or not 0 <= task_id < SPLIT_SIZES[split]:
            raise KeyError((split, task_id))
        game_file = ensure_game(self.root, split, task_id)
        spec = task_spec(self.name, split, task_id, game_file, self.root)
        return AlfworldEpisode(spec, game_file, seed)
