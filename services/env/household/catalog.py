"""What the household world can contain, and which task each (split, task_id) is.

This module holds the vocabulary (room types, receptacle types, object types and
where each object may sit), the room layouts, the train / unseen partition of
layouts and of (task_type, object type, target type) combinations, the
deterministic construction of a task from its (split, task_id), and the fixed
order in which the expert searches a room for an object (search_order). It knows
nothing of commands or feedback text; world.py plays the tasks built here.

Determinism: every random choice comes from a ``random.Random`` seeded with an
integer derived by SHA-256 from a fixed string, so a task is the same in every
process whatever PYTHONHASHSEED is.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

TASK_TYPES: tuple[str, ...] = (
    "pick_and_place",
    "look_at_obj_in_light",
    "pick_clean_then_place",
    "pick_heat_then_place",
    "pick_cool_then_place",
    "pick_two_obj_and_place",
)

SPLIT_SIZES: dict[str, int] = {"train": 3553, "valid_seen": 140, "valid_unseen": 134}

# Which side of the partition a split draws its layouts and combinations from:
# valid_seen reuses the train side with a different seed stream.
SPLIT_SIDE: dict[str, str] = {"train": "seen", "valid_seen": "seen", "valid_unseen": "unseen"}

OPENABLE: frozenset[str] = frozenset({"cabinet", "drawer", "fridge", "microwave", "safe"})

# The receptacle type each processing verb needs (ALFWorld: sinkbasin, microwave, fridge).
APPLIANCE_FOR_VERB: dict[str, str] = {"clean": "sinkbasin", "heat": "microwave", "cool": "fridge"}
VERB_FOR_APPLIANCE: dict[str, str] = {kind: verb for verb, kind in APPLIANCE_FOR_VERB.items()}

# The object state a task type asks for, named as the verb that produces it.
REQUIRED_VERB: dict[str, str | None] = {
    "pick_and_place": None,
    "look_at_obj_in_light": None,
    "pick_clean_then_place": "clean",
    "pick_heat_then_place": "heat",
    "pick_cool_then_place": "cool",
    "pick_two_obj_and_place": None,
}

LAMP_TYPE = "desklamp"
LAMP_HOSTS: tuple[str, ...] = ("desk", "dresser", "sidetable")  # alphabetical: see search_order
LIT_ROOMS: frozenset[str] = frozenset({"bedroom", "livingroom"})

# Per room: (receptacle type, min count, max count), in the order the room lists them.
ROOM_RECIPES: dict[str, tuple[tuple[str, int, int], ...]] = {
    "kitchen": (
        ("cabinet", 2, 5),
        ("coffeemachine", 0, 1),
        ("countertop", 1, 2),
        ("diningtable", 0, 1),
        ("drawer", 1, 3),
        ("fridge", 1, 1),
        ("garbagecan", 1, 1),
        ("microwave", 1, 1),
        ("shelf", 0, 2),
        ("sinkbasin", 1, 1),
        ("stoveburner", 1, 3),
        ("toaster", 0, 1),
    ),
    "bathroom": (
        ("bathtubbasin", 0, 1),
        ("cabinet", 1, 4),
        ("countertop", 1, 1),
        ("drawer", 0, 3),
        ("garbagecan", 1, 1),
        ("handtowelholder", 0, 1),
        ("shelf", 0, 2),
        ("sinkbasin", 1, 2),
        ("toilet", 1, 1),
        ("toiletpaperhanger", 1, 1),
        ("towelholder", 0, 1),
    ),
    "bedroom": (
        ("armchair", 0, 1),
        ("bed", 1, 1),
        ("desk", 0, 1),
        ("drawer", 2, 5),
        ("dresser", 0, 1),
        ("garbagecan", 1, 1),
        ("laundryhamper", 0, 1),
        ("safe", 0, 1),
        ("shelf", 1, 3),
        ("sidetable", 0, 2),
    ),
    "livingroom": (
        ("armchair", 0, 2),
        ("cabinet", 0, 3),
        ("coffeetable", 1, 1),
        ("diningtable", 0, 1),
        ("drawer", 1, 4),
        ("dresser", 0, 1),
        ("garbagecan", 1, 1),
        ("ottoman", 0, 1),
        ("shelf", 0, 3),
        ("sidetable", 1, 2),
        ("sofa", 1, 1),
        ("tvstand", 0, 1),
    ),
}

_FOOD_HOSTS = ("countertop", "diningtable", "fridge", "garbagecan", "microwave", "sinkbasin")
_DISH_HOSTS = ("cabinet", "countertop", "diningtable", "fridge", "microwave", "shelf", "sinkbasin")
_UTENSIL_HOSTS = ("countertop", "diningtable", "drawer", "sinkbasin")
_CONDIMENT_HOSTS = ("cabinet", "countertop", "diningtable", "drawer", "shelf")
_DESK_HOSTS = ("desk", "dresser", "shelf", "sidetable")
_SMALL_BEDROOM_HOSTS = ("desk", "drawer", "dresser", "safe", "shelf", "sidetable")
_SMALL_LIVING_HOSTS = ("cabinet", "coffeetable", "drawer", "dresser", "sidetable", "tvstand")

# Per room: object type -> receptacle types it may start on or be put on as a goal.
_ROOM_OBJECTS: dict[str, dict[str, tuple[str, ...]]] = {
    "kitchen": {
        "apple": _FOOD_HOSTS,
        "bread": (*_FOOD_HOSTS, "toaster"),
        "egg": _FOOD_HOSTS,
        "lettuce": _FOOD_HOSTS,
        "potato": _FOOD_HOSTS,
        "tomato": _FOOD_HOSTS,
        "bowl": _DISH_HOSTS,
        "cup": _DISH_HOSTS,
        "mug": (*_DISH_HOSTS, "coffeemachine"),
        "plate": _DISH_HOSTS,
        "pan": ("cabinet", "countertop", "diningtable", "sinkbasin", "stoveburner"),
        "pot": ("cabinet", "countertop", "diningtable", "fridge", "sinkbasin", "stoveburner"),
        "kettle": ("cabinet", "countertop", "shelf", "stoveburner"),
        "butterknife": _UTENSIL_HOSTS,
        "fork": _UTENSIL_HOSTS,
        "knife": _UTENSIL_HOSTS,
        "ladle": _UTENSIL_HOSTS,
        "spatula": _UTENSIL_HOSTS,
        "spoon": _UTENSIL_HOSTS,
        "dishsponge": ("cabinet", "countertop", "drawer", "sinkbasin"),
        "peppershaker": _CONDIMENT_HOSTS,
        "saltshaker": _CONDIMENT_HOSTS,
        "winebottle": ("cabinet", "countertop", "diningtable", "fridge", "shelf"),
    },
    "bathroom": {
        "candle": ("cabinet", "countertop", "drawer", "shelf", "toilet"),
        "cloth": ("bathtubbasin", "cabinet", "countertop", "drawer", "shelf", "sinkbasin"),
        "handtowel": ("cabinet", "countertop", "handtowelholder"),
        "soapbar": ("bathtubbasin", "cabinet", "countertop", "garbagecan", "sinkbasin", "toilet"),
        "soapbottle": ("cabinet", "countertop", "garbagecan", "shelf", "toilet"),
        "spraybottle": ("cabinet", "countertop", "drawer", "garbagecan", "shelf", "toilet"),
        "tissuebox": ("cabinet", "countertop", "shelf", "toilet"),
        "toiletpaper": ("cabinet", "countertop", "drawer", "shelf", "toilet", "toiletpaperhanger"),
        "towel": ("bathtubbasin", "cabinet", "shelf", "towelholder"),
    },
    "bedroom": {
        "alarmclock": _DESK_HOSTS,
        "baseballbat": ("bed", "desk", "laundryhamper"),
        "basketball": ("bed", "desk", "laundryhamper"),
        "book": ("armchair", "bed", "desk", "drawer", "dresser", "shelf", "sidetable"),
        "bowl": _DESK_HOSTS,
        "cd": (*_SMALL_BEDROOM_HOSTS, "garbagecan"),
        "cellphone": ("bed", *_SMALL_BEDROOM_HOSTS),
        "cloth": ("armchair", "bed", "drawer", "dresser", "laundryhamper"),
        "creditcard": ("bed", *_SMALL_BEDROOM_HOSTS),
        "keychain": _SMALL_BEDROOM_HOSTS,
        "laptop": ("armchair", "bed", "desk", "dresser", "sidetable"),
        "mug": _DESK_HOSTS,
        "pen": (*_SMALL_BEDROOM_HOSTS, "garbagecan"),
        "pencil": (*_SMALL_BEDROOM_HOSTS, "garbagecan"),
        "pillow": ("armchair", "bed"),
        "teddybear": ("armchair", "bed", "shelf"),
        "tennisracket": ("bed", "desk", "laundryhamper"),
        "vase": _DESK_HOSTS,
        "watch": _SMALL_BEDROOM_HOSTS,
    },
    "livingroom": {
        "book": ("armchair", "coffeetable", "diningtable", "shelf", "sidetable", "sofa"),
        "box": ("armchair", "coffeetable", "diningtable", "dresser", "ottoman", "sofa"),
        "cellphone": ("armchair", *_SMALL_LIVING_HOSTS, "sofa"),
        "creditcard": ("armchair", *_SMALL_LIVING_HOSTS, "sofa"),
        "keychain": _SMALL_LIVING_HOSTS,
        "laptop": ("armchair", "coffeetable", "diningtable", "ottoman", "sofa"),
        "newspaper": ("armchair", "coffeetable", "diningtable", "ottoman", "sidetable", "sofa"),
        "pillow": ("armchair", "ottoman", "sofa"),
        "plate": ("cabinet", "coffeetable", "diningtable", "shelf", "sidetable"),
        "remotecontrol": ("armchair", "coffeetable", "ottoman", "sidetable", "sofa", "tvstand"),
        "statue": ("coffeetable", "diningtable", "dresser", "shelf", "sidetable", "tvstand"),
        "tissuebox": ("coffeetable", "diningtable", "dresser", "shelf", "sidetable"),
        "vase": ("coffeetable", "diningtable", "dresser", "shelf", "sidetable", "tvstand"),
        "watch": _SMALL_LIVING_HOSTS,
    },
}
# Host types in alphabetical order: a host list's order is the expert's search order
# (see search_order), and alphabetical is the one rule that holds for every object.
ROOM_OBJECTS: dict[str, dict[str, tuple[str, ...]]] = {
    room: {kind: tuple(sorted(hosts)) for kind, hosts in objects.items()}
    for room, objects in _ROOM_OBJECTS.items()
}

# Which objects each processing verb applies to as a task (any object can be processed).
TASK_OBJECTS_FOR_VERB: dict[str, frozenset[str]] = {
    "clean": frozenset(
        {"apple", "lettuce", "potato", "tomato", "bowl", "cup", "mug", "plate", "pan", "pot"}
        | {"butterknife", "fork", "knife", "ladle", "spatula", "spoon", "cloth", "soapbar"}
    ),
    "heat": frozenset({"apple", "bread", "egg", "potato", "tomato", "cup", "mug", "plate"}),
    "cool": frozenset(
        {"apple", "bread", "egg", "lettuce", "potato", "tomato", "bowl", "cup", "mug", "plate"}
        | {"pan", "pot", "winebottle"}
    ),
}

# Many layouts per room type, so that an agent learns to read the room description
# rather than each train room's search order by heart (with six it did).
LAYOUTS_PER_ROOM = 32
UNSEEN_LAYOUTS_PER_ROOM = 4  # the last four of each room: never used by train / valid_seen
MIN_RECEPTACLES, MAX_RECEPTACLES = 8, 16
MAX_OBJECTS_PER_RECEPTACLE = 4

# One combination in UNSEEN_COMBINATION_MODULUS goes to the unseen side.
UNSEEN_COMBINATION_MODULUS = 5

Combination = tuple[str, str, str]  # (task_type, object type, target receptacle / lamp type)


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from ``parts`` that is the same in every process (unlike hash())."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


@dataclass(frozen=True)
class Layout:
    """A room's receptacles; ``receptacles`` is in the order the room describes them."""

    layout_id: str
    room: str
    side: str  # "seen" or "unseen"
    receptacles: tuple[str, ...]

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(name.rsplit(" ", 1)[0] for name in self.receptacles)

    def of_kind(self, kind: str) -> tuple[str, ...]:
        return tuple(name for name in self.receptacles if name.rsplit(" ", 1)[0] == kind)


@dataclass(frozen=True)
class TaskBlueprint:
    """Everything that fixes a task's initial world; world.py turns it into a playable state."""

    split: str
    task_id: int
    task_type: str
    layout: Layout
    object_type: str
    target_type: str  # a receptacle type, or the lamp type for look_at_obj_in_light
    goal: str
    placements: tuple[tuple[str, str], ...]  # (object name, receptacle name), sorted

    @property
    def combination(self) -> Combination:
        return (self.task_type, self.object_type, self.target_type)

    def canonical(self) -> tuple:
        """A hashable description of the initial world and the task, for equality checks."""
        layout_id = self.layout.layout_id
        return (layout_id, self.task_type, self.object_type, self.target_type, self.placements)


def _object_kind(name: str) -> str:
    return name.rsplit(" ", 1)[0]


def _receptacle_list(counts: dict[str, int], room: str) -> tuple[str, ...]:
    # ALFWorld lists numbered instances highest first ("a cabinet 2, a cabinet 1, ...").
    names: list[str] = []
    for kind, _, _ in ROOM_RECIPES[room]:
        names.extend(f"{kind} {number}" for number in range(counts.get(kind, 0), 0, -1))
    return tuple(names)


@cache
def layouts() -> tuple[Layout, ...]:
    """All layouts, LAYOUTS_PER_ROOM per room; the last UNSEEN_LAYOUTS_PER_ROOM are unseen."""
    result: list[Layout] = []
    for room, recipe in ROOM_RECIPES.items():
        seen_counts: set[tuple[int, ...]] = set()
        attempt = 0
        while len(seen_counts) < LAYOUTS_PER_ROOM:
            rng = random.Random(stable_seed("layout", room, attempt))
            attempt += 1
            counts = {kind: rng.randint(low, high) for kind, low, high in recipe}
            total = sum(counts.values())
            key = tuple(counts[kind] for kind, _, _ in recipe)
            lamp_host = any(counts.get(kind, 0) for kind in LAMP_HOSTS)
            if not MIN_RECEPTACLES <= total <= MAX_RECEPTACLES or key in seen_counts:
                continue
            if room in LIT_ROOMS and not lamp_host:
                continue
            index = len(seen_counts)
            seen_counts.add(key)
            side = "unseen" if index >= LAYOUTS_PER_ROOM - UNSEEN_LAYOUTS_PER_ROOM else "seen"
            receptacles = _receptacle_list(counts, room)
            result.append(Layout(f"{room}-{index}", room, side, receptacles))
    return tuple(result)


@cache
def layout_by_id() -> dict[str, Layout]:
    return {layout.layout_id: layout for layout in layouts()}


def _task_type_fits_room(task_type: str, room: str) -> bool:
    if task_type == "look_at_obj_in_light":
        return room in LIT_ROOMS
    verb = REQUIRED_VERB[task_type]
    if verb is None:
        return True
    return any(kind == APPLIANCE_FOR_VERB[verb] for kind, _, _ in ROOM_RECIPES[room])


def _room_combinations(room: str) -> set[Combination]:
    combinations: set[Combination] = set()
    for task_type in TASK_TYPES:
        if not _task_type_fits_room(task_type, room):
            continue
        verb = REQUIRED_VERB[task_type]
        for object_type, hosts in ROOM_OBJECTS[room].items():
            if task_type == "look_at_obj_in_light":
                combinations.add((task_type, object_type, LAMP_TYPE))
                continue
            if verb is not None and object_type not in TASK_OBJECTS_FOR_VERB[verb]:
                continue
            for target in hosts:
                # ALFWorld never asks to cool a thing and then put it in the fridge (etc.).
                if verb is not None and target == APPLIANCE_FOR_VERB[verb]:
                    continue
                combinations.add((task_type, object_type, target))
    return combinations


def combination_side(combination: Combination) -> str:
    """Which side of the partition a (task_type, object, target) combination belongs to."""
    return (
        "unseen"
        if stable_seed("combination", *combination) % UNSEEN_COMBINATION_MODULUS == 0
        else "seen"
    )


def _fits_layout(combination: Combination, layout: Layout) -> bool:
    task_type, object_type, target = combination
    hosts = ROOM_OBJECTS[layout.room].get(object_type)
    if hosts is None or not _task_type_fits_room(task_type, layout.room):
        return False
    kinds = layout.kinds
    verb = REQUIRED_VERB[task_type]
    if verb is not None and APPLIANCE_FOR_VERB[verb] not in kinds:
        return False
    if task_type == "look_at_obj_in_light":
        # Two host instances: the object must be able to start away from the lamp.
        return sum(len(layout.of_kind(kind)) for kind in hosts) >= 2
    # The object must be able to start somewhere other than a target receptacle.
    return target in kinds and any(kind in kinds for kind in hosts if kind != target)


@cache
def _combination_layouts(side: str, task_type: str) -> dict[Combination, tuple[Layout, ...]]:
    """Each ``side`` combination of ``task_type`` that a ``side`` layout fits, with its layouts."""
    fitting: dict[Combination, list[Layout]] = {}
    for layout in layouts():
        if layout.side != side:
            continue
        for combination in _room_combinations(layout.room):
            if (
                combination[0] == task_type
                and combination_side(combination) == side
                and _fits_layout(combination, layout)
            ):
                fitting.setdefault(combination, []).append(layout)
    if not fitting:
        raise RuntimeError(f"no {side} layout fits any {task_type} combination")
    return {combination: tuple(fitting[combination]) for combination in sorted(fitting)}


@cache
def _combination_order(split: str, task_type: str) -> tuple[Combination, ...]:
    """The split's fixed shuffled cycle of combinations for ``task_type``.

    Walking a cycle rather than drawing at random means train (592 tasks per type)
    covers every seen-side combination, so valid_seen never asks for one train lacks.
    """
    order = list(_combination_layouts(SPLIT_SIDE[split], task_type))
    random.Random(stable_seed("combination-order", split, task_type)).shuffle(order)
    return tuple(order)


def goal_sentence(task_type: str, object_type: str, target_type: str) -> str:
    """The goal in ALFWorld's phrasing, e.g. "put a clean apple in fridge."."""
    if task_type == "look_at_obj_in_light":
        return f"look at {object_type} under the {target_type}."
    if task_type == "pick_two_obj_and_place":
        return f"put two {object_type} in {target_type}."
    adjective = {"clean": "clean ", "heat": "hot ", "cool": "cool "}.get(
        REQUIRED_VERB[task_type] or "", ""
    )
    return f"put a {adjective}{object_type} in {target_type}."


@cache
def _host_spots(layout_id: str, object_kind: str) -> tuple[str, ...]:
    """The receptacles of a layout that ``object_kind`` may sit on."""
    layout = layout_by_id()[layout_id]
    hosts = ROOM_OBJECTS[layout.room][object_kind]
    return tuple(name for name in layout.receptacles if _object_kind(name) in hosts)


def receptacle_number(name: str) -> int:
    """The instance number of a receptacle name: 2 for "cabinet 2"."""
    return int(name.rsplit(" ", 1)[1])


@cache
def search_order(layout: Layout, kinds: tuple[str, ...]) -> tuple[str, ...]:
    """The layout's receptacles of the types ``kinds``, in the expert's search order.

    The order in which the room description names them (as ALFWorld lists a room:
    types in the room's order, numbered instances highest first), so that a search
    walks down the list the agent read on arrival: "cabinet 2, cabinet 1, fridge 1, ...".
    """
    wanted = set(kinds)
    return tuple(name for name in layout.receptacles if _object_kind(name) in wanted)


def object_search_order(
    layout: Layout, task_type: str, object_type: str, target_type: str
) -> tuple[str, ...]:
    """Where a task's objects may start, in search order (see search_order).

    Every host type of the object except the target type: _place_objects never starts a
    task object in a receptacle of the target type, so searching there is wasted. (For
    look_at_obj_in_light the excluded spot is the lamp's receptacle, which is unknown
    until seen, so nothing is left out.)
    """
    hosts = ROOM_OBJECTS[layout.room][object_type]
    if task_type != "look_at_obj_in_light":
        hosts = tuple(kind for kind in hosts if kind != target_type)
    return search_order(layout, hosts)


def lamp_search_order(layout: Layout) -> tuple[str, ...]:
    """Where the lamp may stand, in search order (see search_order)."""
    return search_order(layout, LAMP_HOSTS)


def _place_objects(
    rng: random.Random, layout: Layout, task_type: str, object_type: str, target_type: str
) -> tuple[tuple[str, str], ...]:
    room_objects = ROOM_OBJECTS[layout.room]
    load: dict[str, int] = {name: 0 for name in layout.receptacles}
    placements: list[tuple[str, str]] = []
    counters: dict[str, int] = {}

    def place(kind: str, spots: Sequence[str]) -> None:
        free = [spot for spot in spots if load[spot] < MAX_OBJECTS_PER_RECEPTACLE] or spots
        spot = rng.choice(free)
        counters[kind] = counters.get(kind, 0) + 1
        load[spot] += 1
        placements.append((f"{kind} {counters[kind]}", spot))

    def host_spots(kind: str) -> tuple[str, ...]:
        return _host_spots(layout.layout_id, kind)

    lamp_spot = None
    if layout.room in LIT_ROOMS:
        lamp_spot = rng.choice(
            [name for name in layout.receptacles if _object_kind(name) in LAMP_HOSTS]
        )
        place(LAMP_TYPE, [lamp_spot])

    # Task objects never start where they would already satisfy (or trivially shortcut) the goal.
    forbidden = (
        {lamp_spot} if task_type == "look_at_obj_in_light" else set(layout.of_kind(target_type))
    )
    task_spots = [spot for spot in host_spots(object_type) if spot not in forbidden]
    copies = rng.choice((2, 2, 3) if task_type == "pick_two_obj_and_place" else (1, 1, 2))
    for _ in range(copies):
        place(object_type, task_spots)

    distractor_kinds = sorted(
        kind for kind in room_objects if kind != object_type and host_spots(kind)
    )
    for _ in range(rng.randint(5, 10)):
        kind = rng.choice(distractor_kinds)
        place(kind, host_spots(kind))
    return tuple(sorted(placements))


@cache
def build_task(split: str, task_id: int) -> TaskBlueprint:
    """The task for (split, task_id); KeyError for an unknown split or an out-of-range id."""
    if split not in SPLIT_SIZES:
        raise KeyError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SIZES)}")
    if not isinstance(task_id, int) or not 0 <= task_id < SPLIT_SIZES[split]:
        raise KeyError(f"task id {task_id!r} out of range for split {split!r}")
    # Cycling through the task types keeps them balanced and present in every split.
    task_type = TASK_TYPES[task_id % len(TASK_TYPES)]
    order = _combination_order(split, task_type)
    combination = order[(task_id // len(TASK_TYPES)) % len(order)]
    _, object_type, target_type = combination
    rng = random.Random(stable_seed("household", split, task_id))
    layout = rng.choice(_combination_layouts(SPLIT_SIDE[split], task_type)[combination])
    placements = _place_objects(rng, layout, task_type, object_type, target_type)
    return TaskBlueprint(
        split=split,
        task_id=task_id,
        task_type=task_type,
        layout=layout,
        object_type=object_type,
        target_type=target_type,
        goal=goal_sentence(task_type, object_type, target_type),
        placements=placements,
    )


def task_combination(split: str, task_id: int) -> Combination:
    """The (task_type, object type, target type) combination of a task."""
    return build_task(split, task_id).combination
