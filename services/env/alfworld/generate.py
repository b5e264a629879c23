"""Offline generator of ALFWorld-format games from the floor plans and PDDL in the alfworld wheel.

ALFWorld's own games come from a download (ALFRED's traj_data.json plus an
initial_state.pddl recorded in AI2-THOR, turned into game.tw-pddl by
``alfworld-generate``). Without that download this module builds the same files
from what the wheel ships:

- ``alfworld/gen/layouts/FloorPlan<N>-openable.json``: every receptacle instance of
  the AI2-THOR scene by its THOR id (``Cabinet|+00.68|+00.50|-02.20``) with the pose
  from which the agent can reach it;
- ``FloorPlan<N>-objects.json``: the object types the scene holds;
- ``FloorPlan<N>-layout.npy``: the reachable floor points (the agent starts on one);
- ``alfworld/gen/constants.py``: which object types each receptacle type accepts,
  which can be cleaned / heated / cooled / sliced, room type per floor plan;
- ``alfworld/gen/goal_library.py``: the goal PDDL and the goal sentence templates of
  each task type;
- ``alfworld/data/alfred.pddl`` and ``alfred.twl2``: the domain and the text grammar.

For each task the generator samples (deterministically, from split, task id and
attempt) a floor plan that can host the task type, the task's targets, and a placement
of the scene's object types in receptacles that accept them; writes the PDDL problem
(ALFRED's object naming, escaped as ALFWorld escapes it: ``|`` -> ``_bar_``, ``-`` ->
``_minus_``, ...), a traj_data.json with the fields ALFWorld reads (task_type,
pddl_params, the templated goal) and the scene it stands for (floor plan, object poses,
the agent's start), and game.tw-pddl exactly as ``alfworld-generate`` lays it out
(pddl_domain, grammar with the goal filled in, pddl_problem, solvable, walkthrough).
Then it plays ALFWorld's handcoded expert on the real engine, as ``alfworld-generate``
does, and keeps the game only if the expert wins within MAX_TURNS; otherwise the next
attempt is drawn (the failed attempt stays on disk marked ``"solvable": false``, as
ALFWorld marks its own, and is skipped).

On-disk layout (the downloaded data's): ``<root>/json_2.1.1/<split>/<task_type>-<Object>-
None-<Parent>-<scene>/trial_G<task id>_<attempt>/{game.tw-pddl,traj_data.json}`` and
``<root>/logic/{alfred.pddl,alfred.twl2}``. Splits: train and valid_seen sample from the
same floor plans (different seed streams); valid_unseen from ALFRED's own unseen
validation floor plans (10, 219, 308, 424), which train and valid_seen never use.

What is simplified, and why: object positions are synthetic (near their receptacle;
only the receptacle poses come from AI2-THOR), each object type of the scene appears
one to three times, lamps stand in or on a furniture receptacle (the ToggleObject
action of the domain needs the lamp in a receptacle), and no task uses movable
receptacles or slicing (ALFWorld's text games skip those too).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

GENERATOR_VERSION = 1
GENERATOR_SEED = 0
CACHE_ENV_VAR = "SAGE_OPD_ALFWORLD_GENERATED_CACHE"

TASK_TYPES: tuple[str, ...] = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
# The sizes of ALFWorld's own splits (solvable games of json_2.1.1).
SPLIT_SIZES: dict[str, int] = {"train": 3553, "valid_seen": 140, "valid_unseen": 134}
# ALFRED's valid_unseen floor plans: one kitchen, living room, bedroom and bathroom.
VALID_UNSEEN_FLOOR_PLANS: frozenset[int] = frozenset({10, 219, 308, 424})
# ALFWorld's usual episode budget (the families' max_turns); the expert must win within it
# for a game to be kept.
MAX_TURNS = 50
MAX_ATTEMPTS = 20

# The appliance (receptacle type) each processing task type needs.
APPLIANCE: dict[str, str] = {
    "pick_clean_then_place_in_recep": "SinkBasin",
    "pick_heat_then_place_in_recep": "Microwave",
    "pick_cool_then_place_in_recep": "Fridge",
}
# The object property that task type needs (constants.VAL_ACTION_OBJECTS key).
ACTION_PROPERTY: dict[str, str] = {
    "pick_clean_then_place_in_recep": "Cleanable",
    "pick_heat_then_place_in_recep": "Heatable",
    "pick_cool_then_place_in_recep": "Coolable",
}
LAMP_TYPES: tuple[str, ...] = ("DeskLamp", "FloorLamp")
LAMP_HOSTS: tuple[str, ...] = (
    "Desk",
    "SideTable",
    "Dresser",
    "Shelf",
    "CoffeeTable",
    "DiningTable",
    "TVStand",
    "Sofa",
    "ArmChair",
)


def default_cache_dir() -> Path:
    """Where generated games live: $SAGE_OPD_ALFWORLD_GENERATED_CACHE or
    ~/.cache/sage-opd/alfworld-generated (one subfolder per generator version)."""
    configured = os.environ.get(CACHE_ENV_VAR)
    base = Path(configured) if configured else Path.home() / ".cache/sage-opd/alfworld-generated"
    return base / f"v{GENERATOR_VERSION}"


def _alfworld_file(*parts: str) -> Path:
    return Path(str(importlib.resources.files("alfworld").joinpath(*parts)))


@cache
def _constants() -> Any:
    import alfworld.gen.constants as constants

    return constants


def pddl_name(thor_id: str) -> str:
    """ALFWorld's escaping of an AI2-THOR id into a PDDL name (PlannedGameState's rules)."""
    for old, new in (("-", "_minus_"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_")):
        thor_id = thor_id.replace(old, new)
    return thor_id.replace(",", "_comma_")


def _rng(*key: object) -> random.Random:
    # Seeded from SHA-256 of the key, so a task is the same in every process.
    digest = hashlib.sha256(":".join(map(str, (GENERATOR_SEED, *key))).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# ------------------------------------------------------------------------- floor plans


@dataclass(frozen=True)
class Receptacle:
    thor_id: str  # e.g. "Sink|-01.90|+00.97|-01.50|SinkBasin"
    kind: str  # receptacle type, e.g. "SinkBasin"
    pose: tuple[int, int, int, int]  # ALFRED grid pose: x / 0.25, z / 0.25, rotation / 90, horizon


@dataclass(frozen=True)
class FloorPlan:
    number: int
    room: str  # "Kitchen", "LivingRoom", "Bedroom" or "Bathroom"
    receptacles: tuple[Receptacle, ...]
    object_types: frozenset[str]  # the scene's portable object types (and lamps)
    floor_points: tuple[tuple[float, float], ...]

    @property
    def receptacle_types(self) -> frozenset[str]:
        return frozenset(r.kind for r in self.receptacles)


def _receptacle_kind(thor_id: str) -> str:
    parts = thor_id.split("|")
    return parts[-1] if parts[-1].endswith("Basin") else parts[0]


@cache
def floor_plans() -> dict[int, FloorPlan]:
    """Every floor plan the wheel ships, by number."""
    import numpy as np

    constants = _constants()
    accepts = constants.VAL_RECEPTACLE_OBJECTS
    portable = {o for objects in accepts.values() for o in objects if not o.endswith("Sliced")}
    layouts = _alfworld_file("gen", "layouts")
    plans = {}
    for openable_file in sorted(layouts.glob("FloorPlan*-openable.json")):
        number = int(openable_file.name.removeprefix("FloorPlan").split("-")[0])
        poses = json.loads(openable_file.read_text())
        receptacles = tuple(
            Receptacle(
                thor_id,
                _receptacle_kind(thor_id),
                (round(x / 0.25), round(z / 0.25), round(rotation / 90) % 4, round(horizon)),
            )
            for thor_id, (x, z, rotation, horizon) in sorted(poses.items())
            if _receptacle_kind(thor_id) in accepts
        )
        scene_types = json.loads((layouts / f"FloorPlan{number}-objects.json").read_text())
        points = np.load(layouts / f"FloorPlan{number}-layout.npy")
        room = next(r for r, numbers in constants.SCENE_TYPE.items() if number in numbers)
        plans[number] = FloorPlan(
            number=number,
            room=room,
            receptacles=receptacles,
            object_types=frozenset(t for t in scene_types if t in portable or t in LAMP_TYPES),
            floor_points=tuple((float(x), float(z)) for x, z in points),
        )
    return plans


def split_floor_plans(split: str) -> list[FloorPlan]:
    """valid_unseen: ALFRED's unseen floor plans; train and valid_seen: all the others."""
    plans = floor_plans()
    if split == "valid_unseen":
        return [plans[n] for n in sorted(VALID_UNSEEN_FLOOR_PLANS)]
    return [plan for n, plan in sorted(plans.items()) if n not in VALID_UNSEEN_FLOOR_PLANS]


# ------------------------------------------------------------------------- task drafts


@dataclass(frozen=True)
class Placement:
    thor_id: str  # e.g. "Apple|+00.53|+00.95|-02.31"
    kind: str
    receptacle: Receptacle


@dataclass(frozen=True)
class TaskDraft:
    """Everything a generated game is made of; a pure function of (split, task_id, attempt)."""

    split: str
    task_id: int
    attempt: int
    task_type: str
    floor_plan: FloorPlan
    object_target: str
    parent_target: str  # "" for look_at_obj_in_light
    toggle_target: str  # "" unless look_at_obj_in_light
    placements: tuple[Placement, ...]
    agent_pose: tuple[int, int, int, int]
    goal: str  # the templated task description, e.g. "put a clean apple in fridge"

    @property
    def folder(self) -> str:
        """ALFRED's folder name: <task_type>-<object>-<movable recep>-<parent>-<scene>."""
        target = self.parent_target or self.toggle_target
        return f"{self.task_type}-{self.object_target}-None-{target}-{self.floor_plan.number}"

    @property
    def trial(self) -> str:
        return f"trial_G{self.task_id:05d}_{self.attempt:02d}"


def _fits(object_type: str, receptacle_type: str) -> bool:
    return object_type in _constants().VAL_RECEPTACLE_OBJECTS.get(receptacle_type, ())


@cache
def _task_candidates(task_type: str, plan_number: int) -> tuple[tuple[str, str, str], ...]:
    """(object, parent, toggle) triples the task type can use in this floor plan."""
    constants = _constants()
    plan = floor_plans()[plan_number]
    if plan.room not in constants.GOALS_VALID[task_type]:
        return ()
    receptacle_types = plan.receptacle_types
    portable = sorted(plan.object_types - set(LAMP_TYPES))
    if task_type == "look_at_obj_in_light":
        lamps = sorted(plan.object_types & set(LAMP_TYPES))
        if not lamps or not receptacle_types & set(LAMP_HOSTS):
            return ()
        return tuple(
            (obj, "", lamp)
            for obj in portable
            for lamp in lamps
            if any(_fits(obj, r) for r in receptacle_types)
        )
    appliance = APPLIANCE.get(task_type)
    if appliance and appliance not in receptacle_types:
        return ()
    allowed = constants.VAL_ACTION_OBJECTS[ACTION_PROPERTY[task_type]] if appliance else None
    triples = []
    for obj in portable:
        if allowed is not None and obj not in allowed:
            continue
        for parent in sorted(receptacle_types):
            # The object must fit the parent, and start somewhere else (or the goal holds
            # from the start); the parent is never the appliance the task itself uses.
            if parent in {appliance, "BathtubBasin" if appliance else None}:
                continue
            if not _fits(obj, parent):
                continue
            if any(_fits(obj, r) for r in receptacle_types - {parent}):
                triples.append((obj, parent, ""))
    return tuple(triples)


def _object_id(kind: str, receptacle: Receptacle, rng: random.Random, taken: set[str]) -> str:
    # Synthetic coordinates near the receptacle's own (its THOR id carries x|y|z).
    x, y, z = (float(v) for v in receptacle.thor_id.split("|")[1:4])
    while True:
        dx, dy, dz = (rng.uniform(-0.3, 0.3) for _ in range(3))
        thor_id = f"{kind}|{x + dx:+06.2f}|{y + abs(dy) / 3:+06.2f}|{z + dz:+06.2f}"
        if thor_id not in taken:
            taken.add(thor_id)
            return thor_id


def draft_task(split: str, task_id: int, attempt: int = 0) -> TaskDraft:
    """The task for (split, task_id, attempt); task types go round-robin over task ids."""
    if split not in SPLIT_SIZES or not 0 <= task_id < SPLIT_SIZES[split]:
        raise KeyError((split, task_id))
    task_type = TASK_TYPES[task_id % len(TASK_TYPES)]
    rng = _rng(split, task_id, attempt)
    hosts = [p for p in split_floor_plans(split) if _task_candidates(task_type, p.number)]
    plan = rng.choice(hosts)
    object_target, parent_target, toggle_target = rng.choice(
        _task_candidates(task_type, plan.number)
    )

    taken: set[str] = set()
    placements: list[Placement] = []
    receptacles = list(plan.receptacles)
    for kind in sorted(plan.object_types - set(LAMP_TYPES)):
        spots = [r for r in receptacles if _fits(kind, r.kind)]
        if kind == object_target:
            spots = [r for r in spots if r.kind != parent_target]
            low = 2 if task_type == "pick_two_obj_and_place" else 1
            count = rng.randint(low, low + 1)
        else:
            count = rng.choice((1, 1, 1, 2, 3))
        for _ in range(count if spots else 0):
            spot = rng.choice(spots)
            placements.append(Placement(_object_id(kind, spot, rng, taken), kind, spot))
    if toggle_target:
        spot = rng.choice([r for r in receptacles if r.kind in LAMP_HOSTS])
        lamp_id = _object_id(toggle_target, spot, rng, taken)
        placements.append(Placement(lamp_id, toggle_target, spot))

    # The agent starts "in the middle of the room": a floor pose no receptacle is seen from.
    receptacle_poses = {r.pose for r in receptacles}
    starts = [
        (round(x / 0.25), round(z / 0.25), rotation, 30)
        for x, z in plan.floor_points
        for rotation in range(4)
    ]
    agent_pose = rng.choice([pose for pose in starts if pose not in receptacle_poses])

    template = rng.choice(_goal_library()[task_type]["templates"])
    goal = template.format(
        obj=object_target.lower(), recep=parent_target.lower(), toggle=toggle_target.lower()
    )
    return TaskDraft(
        split=split,
        task_id=task_id,
        attempt=attempt,
        task_type=task_type,
        floor_plan=plan,
        object_target=object_target,
        parent_target=parent_target,
        toggle_target=toggle_target,
        placements=tuple(placements),
        agent_pose=agent_pose,
        goal=goal,
    )


@cache
def _goal_library() -> dict[str, Any]:
    import alfworld.gen.goal_library as goal_library

    return goal_library.gdict


# ------------------------------------------------------------------------- files


def _location(pose: tuple[int, int, int, int]) -> str:
    return pddl_name("loc|{}|{}|{}|{}".format(*pose))


def problem_pddl(draft: TaskDraft) -> str:
    """The PDDL problem of a draft, for ALFWorld's alfred.pddl domain."""
    constants = _constants()
    plan = draft.floor_plan
    # Every type name the domain or a goal may mention is declared, as ALFRED's files do;
    # movable receptacles (bowl, mug, ...) are object types here, never receptacle types.
    accepts = constants.VAL_RECEPTACLE_OBJECTS
    portable_types = sorted(
        {o for objects in accepts.values() for o in objects if not o.endswith("Sliced")}
        | set(LAMP_TYPES)
        | {"Knife", "ButterKnife"}
    )
    receptacle_types = sorted(set(accepts) - constants.MOVABLE_RECEPTACLES_SET)
    poses = {r.pose for r in plan.receptacles} | {draft.agent_pose}
    locations = sorted(_location(pose) for pose in poses)

    objects = ["agent1 - agent"]
    objects += [f"{t}Type - otype" for t in portable_types]
    objects += [f"{t}Type - rtype" for t in receptacle_types]
    objects += [f"{pddl_name(p.thor_id)} - object" for p in draft.placements]
    objects += [f"{pddl_name(r.thor_id)} - receptacle" for r in plan.receptacles]
    objects += [f"{loc} - location" for loc in locations]

    init = [f"(atLocation agent1 {_location(draft.agent_pose)})"]
    for r in plan.receptacles:
        name = pddl_name(r.thor_id)
        init.append(f"(receptacleType {name} {r.kind}Type)")
        init.append(f"(receptacleAtLocation {name} {_location(r.pose)})")
        if r.kind in constants.OPENABLE_CLASS_SET:
            init.append(f"(openable {name})")
    action_objects = constants.VAL_ACTION_OBJECTS
    for p in draft.placements:
        name = pddl_name(p.thor_id)
        init.append(f"(objectType {name} {p.kind}Type)")
        init.append(f"(inReceptacle {name} {pddl_name(p.receptacle.thor_id)})")
        init.append(f"(objectAtLocation {name} {_location(p.receptacle.pose)})")
        if p.kind in LAMP_TYPES:
            init.append(f"(toggleable {name})")
            continue
        init.append(f"(pickupable {name})")
        if p.kind in constants.MOVABLE_RECEPTACLES_SET:
            init.append(f"(isReceptacleObject {name})")
        for prop, predicate in (
            ("Cleanable", "cleanable"),
            ("Heatable", "heatable"),
            ("Coolable", "coolable"),
            ("Sliceable", "sliceable"),
        ):
            if p.kind in action_objects[prop]:
                init.append(f"({predicate} {name})")
    placed_types = sorted({p.kind for p in draft.placements})
    for r_type in sorted(plan.receptacle_types):
        init += [f"(canContain {r_type}Type {o}Type)" for o in placed_types if _fits(o, r_type)]

    goal = _goal_library()[draft.task_type]["pddl"].format(
        obj=draft.object_target, recep=draft.parent_target, toggle=draft.toggle_target
    )
    goal = goal.replace(" # ", " - ").strip()  # the library writes types as "?r # receptacle"
    pad = "\n        "
    return (
        f"(define (problem plan_{draft.trial})\n"
        f"    (:domain alfred)\n"
        f"    (:objects{pad}{pad.join(objects)}\n    )\n"
        f"    (:init{pad}{pad.join(init)}\n    )\n"
        f"    {goal}\n"  # the library's goal also closes the (define ...)
    )


def traj_data(draft: TaskDraft) -> dict[str, Any]:
    """traj_data.json in ALFRED's shape, with the fields ALFWorld reads filled in."""
    plan = draft.floor_plan
    poses = []
    for p in draft.placements:
        x, y, z = (float(v) for v in p.thor_id.split("|")[1:4])
        poses.append(
            {
                "objectName": f"{p.kind}_{hashlib.sha1(p.thor_id.encode()).hexdigest()[:8]}",
                "objectId": p.thor_id,
                "parentReceptacle": p.receptacle.thor_id,
                "position": {"x": x, "y": y, "z": z},
                "rotation": {"x": 0.0, "y": 0.0, "z": 0.0},
            }
        )
    x, z, rotation, horizon = draft.agent_pose
    return {
        "task_id": draft.trial,
        "task_type": draft.task_type,
        "pddl_params": {
            "object_target": draft.object_target,
            "parent_target": draft.parent_target,
            "toggle_target": draft.toggle_target,
            "mrecep_target": "",
            "object_sliced": False,
        },
        "scene": {
            "floor_plan": f"FloorPlan{plan.number}",
            "scene_num": plan.number,
            "random_seed": draft.attempt,
            "dirty_and_empty": False,
            "object_toggles": [],
            "object_poses": poses,
            "init_action": {
                "action": "TeleportFull",
                "x": x * 0.25,
                "z": z * 0.25,
                "rotation": rotation * 90,
                "horizon": horizon,
            },
        },
        "turk_annotations": {"anns": [{"task_desc": draft.goal, "high_descs": [], "votes": []}]},
        "plan": {"high_pddl": [], "low_actions": []},
        # Not in ALFRED's files: marks the game as generated here, never ALFWorld's own.
        "generator": {
            "name": "sage-opd alfworld-generated",
            "version": GENERATOR_VERSION,
            "seed": GENERATOR_SEED,
            "split": draft.split,
            "task_id": draft.task_id,
            "attempt": draft.attempt,
        },
    }


def write_logic(root: Path) -> None:
    """<root>/logic/alfred.pddl and alfred.twl2, copied from the wheel (the data's layout)."""
    logic = root / "logic"
    logic.mkdir(parents=True, exist_ok=True)
    for name in ("alfred.pddl", "alfred.twl2"):
        if not (logic / name).exists():
            shutil.copyfile(_alfworld_file("data", name), logic / name)


def game_dir(root: Path, draft: TaskDraft) -> Path:
    return root / "json_2.1.1" / draft.split / draft.folder / draft.trial


def write_game(root: Path, draft: TaskDraft) -> Path:
    """Write the draft's traj_data.json and game.tw-pddl (solvable unknown); return the game file.

    Written in a temporary folder and renamed into place, so a reader never sees half a
    game and two writers of the same game leave one.
    """
    target = game_dir(root, draft)
    if (target / "game.tw-pddl").exists():
        return target / "game.tw-pddl"
    write_logic(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    grammar = _alfworld_file("data", "alfred.twl2").read_text()
    game = {
        "pddl_domain": _alfworld_file("data", "alfred.pddl").read_text(),
        "grammar": grammar.replace("UNKNOWN GOAL", draft.goal),  # add_task_to_grammar's rule
        "pddl_problem": problem_pddl(draft),
        "solvable": None,
        "walkthrough": None,
    }
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    (staging / "traj_data.json").write_text(json.dumps(traj_data(draft), indent=1))
    (staging / "game.tw-pddl").write_text(json.dumps(game))
    try:
        staging.rename(target)
    except OSError:  # another writer got there first: its copy is the same game
        shutil.rmtree(staging, ignore_errors=True)
    return target / "game.tw-pddl"


def record_solution(game_file: Path, walkthrough: list[str] | None) -> None:
    """Store the expert's result in the game file, as ``alfworld-generate`` does."""
    game = json.loads(game_file.read_text())
    game["walkthrough"] = walkthrough
    game["solvable"] = walkthrough is not None
    with tempfile.NamedTemporaryFile("w", dir=game_file.parent, delete=False) as staging:
        staging.write(json.dumps(game))
    Path(staging.name).replace(game_file)


def _solvable(game_file: Path) -> bool | None:
    return json.loads(game_file.read_text()).get("solvable")


def ensure_game(root: Path, split: str, task_id: int) -> Path:
    """The game file of (split, task_id), generating and checking it on first use.

    Attempts are drawn in order until the expert wins one; the first winnable attempt
    is the task, in every process and on every machine.
    """
    from services.env.alfworld.engine import play_expert

    for attempt in range(MAX_ATTEMPTS):
        draft = draft_task(split, task_id, attempt)
        game_file = write_game(root, draft)
        solvable = _solvable(game_file)
        if solvable is None:
            walkthrough = play_expert(game_file, MAX_TURNS)
            record_solution(game_file, walkthrough)
            solvable = walkthrough is not None
        if solvable:
            return game_file
    raise RuntimeError(f"no winnable game for {split}/{task_id} in {MAX_ATTEMPTS} attempts")


def generate_games(root: Path, split: str, task_ids: Iterable[int]) -> list[Path]:
    """Generate (or find) the games of these task ids; their game files, in order."""
    return [ensure_game(root, split, task_id) for task_id in task_ids]
