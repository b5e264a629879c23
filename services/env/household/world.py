"""The household world in play: state, ALFWorld's command grammar, feedback text, goal test.

``HouseholdWorld`` is the mutable state built from a catalog ``TaskBlueprint``;
``HouseholdEpisode`` wraps it in the Episode interface. The text follows
ALFWorld (TextWorld with the AlfredDemangler): "You arrive at cabinet 1. The
cabinet 1 is closed.", "You put the apple 1 in/on the fridge 1.", and exactly
"Nothing happens." for any command that does not apply in the current state.

Score: 1.0 once won, 0.0 otherwise (no partial progress is reported). Winning is
sticky: later commands still run, but the outcome stays done / won / 1.0.
"""

from __future__ import annotations

import copy

from client.household import NOTHING_HAPPENS
from services.env.base import Episode, StepOutcome, TaskSpec
from services.env.household.catalog import (
    APPLIANCE_FOR_VERB,
    LAMP_TYPE,
    OPENABLE,
    REQUIRED_VERB,
    VERB_FOR_APPLIANCE,
    TaskBlueprint,
    lamp_search_order,
    object_search_order,
)
from services.env.household.expert import next_expert_action

WELCOME = "-= Welcome to TextWorld, ALFRED! =-"
MAX_TURNS = 30

# The object state each processing verb sets, as the adjective examine prints.
_STATE_WORD = {"clean": "clean", "heat": "hot", "cool": "cool"}


def _kind(name: str) -> str:
    return name.rsplit(" ", 1)[0]


def list_things(names: list[str] | tuple[str, ...]) -> str:
    """ALFWorld's enumeration: "a apple 1, a bread 1, and a cup 1" (or "nothing")."""
    if not names:
        return "nothing"
    if len(names) == 1:
        return f"a {names[0]}"
    return ", ".join(f"a {name}" for name in names[:-1]) + f", and a {names[-1]}"


class Receptacle:
    __slots__ = ("name", "kind", "openable", "is_open", "contents")

    def __init__(self, name: str) -> None:
        self.name = name
        self.kind = _kind(name)
        self.openable = self.kind in OPENABLE
        self.is_open = not self.openable
        self.contents: list[str] = []


class Thing:
    """A portable object (or a lamp, which stays where it is)."""

    __slots__ = ("name", "kind", "location", "states", "is_lamp")

    def __init__(self, name: str, location: str) -> None:
        self.name = name
        self.kind = _kind(name)
        self.location: str | None = location  # None while held
        self.states: set[str] = set()  # verbs applied: "clean", "heat", "cool"
        self.is_lamp = self.kind == LAMP_TYPE


class HouseholdWorld:
    """The hidden state of one household task and the rules that change it."""

    def __init__(self, blueprint: TaskBlueprint) -> None:
        self.blueprint = blueprint
        self.task_type = blueprint.task_type
        self.object_type = blueprint.object_type
        self.target_type = blueprint.target_type
        self.required_verb = REQUIRED_VERB[blueprint.task_type]
        self.needed_count = 2 if blueprint.task_type == "pick_two_obj_and_place" else 1
        self.receptacle_names = blueprint.layout.receptacles
        self.receptacles = {name: Receptacle(name) for name in self.receptacle_names}
        self.things: dict[str, Thing] = {}
        for thing_name, receptacle_name in blueprint.placements:
            self.things[thing_name] = Thing(thing_name, receptacle_name)
            self.receptacles[receptacle_name].contents.append(thing_name)
        self.location: str | None = None  # None: the middle of the room
        self.held: str | None = None
        self.lamps_on: set[str] = set()
        self.won = False
        # Receptacles whose contents the agent has seen this episode (arrived while open,
        # or opened): the expert may use only what lies in these (see expert.py).
        self.observed: set[str] = set()
        layout = blueprint.layout
        self.object_search_order = object_search_order(
            layout, blueprint.task_type, blueprint.object_type, blueprint.target_type
        )
        self.lamp_search_order = lamp_search_order(layout)
        self._goto_actions = {name: f"go to {name}" for name in self.receptacle_names}
        self._admissible: list[str] | None = None

    # ----- descriptions -------------------------------------------------------------------

    def room_description(self) -> str:
        return (
            "You are in the middle of a room. Looking quickly around you, you see "
            f"{list_things(self.receptacle_names)}."
        )

    def initial_observation(self) -> str:
        return f"{WELCOME}\n\n{self.room_description()}\n\nYour task is to: {self.blueprint.goal}"

    def describe_receptacle(self, receptacle: Receptacle) -> str:
        if not receptacle.openable:
            return f"On the {receptacle.name}, you see {list_things(receptacle.contents)}."
        if not receptacle.is_open:
            return f"The {receptacle.name} is closed."
        return f"The {receptacle.name} is open. In it, you see {list_things(receptacle.contents)}."

    def describe_thing(self, thing: Thing) -> str:
        if not thing.states:
            return f"There's nothing special about {thing.name}."
        words = sorted(_STATE_WORD[verb] for verb in thing.states)
        return f"This is a {' and '.join(words)} {thing.name}."

    # ----- goal ---------------------------------------------------------------------------

    def satisfies(self, thing: Thing) -> bool:
        """Whether ``thing`` counts toward the goal wherever it is (type and state)."""
        return thing.kind == self.object_type and (
            self.required_verb is None or self.required_verb in thing.states
        )

    def count_in(self, receptacle: Receptacle) -> int:
        return sum(1 for name in receptacle.contents if self.satisfies(self.things[name]))

    def placement_goal_holds(self) -> bool:
        return any(
            receptacle.kind == self.target_type and self.count_in(receptacle) >= self.needed_count
            for receptacle in self.receptacles.values()
        )

    # ----- commands -----------------------------------------------------------------------

    def execute(self, command: str) -> str:
        """Apply one normalised command; returns the feedback (NOTHING_HAPPENS if inapplicable)."""
        verb, _, rest = command.partition(" ")
        handler = self._handlers.get(verb)
        feedback = handler(self, rest) if handler is not None else None
        if feedback is None:
            return NOTHING_HAPPENS
        self._admissible = None
        return feedback

    def _here(self) -> Receptacle | None:
        return self.receptacles[self.location] if self.location is not None else None

    def _do_look(self, rest: str) -> str | None:
        if rest:
            return None
        if self.location is None:
            return self.room_description()
        return f"You are facing the {self.location}. Next to it, you see nothing."

    def _do_inventory(self, rest: str) -> str | None:
        if rest:
            return None
        if self.held is None:
            return "You are not carrying anything."
        return f"You are carrying: a {self.held}."

    def _do_go(self, rest: str) -> str | None:
        if not rest.startswith("to "):
            return None
        receptacle = self.receptacles.get(rest[3:])
        if receptacle is None or receptacle.name == self.location:
            return None
        self.location = receptacle.name
        if receptacle.is_open:
            self.observed.add(receptacle.name)
        return f"You arrive at {receptacle.name}. {self.describe_receptacle(receptacle)}"

    def _do_open(self, rest: str) -> str | None:
        here = self._here()
        if here is None or rest != here.name or not here.openable or here.is_open:
            return None
        here.is_open = True
        self.observed.add(here.name)
        return f"You open the {here.name}. {self.describe_receptacle(here)}"

    def _do_close(self, rest: str) -> str | None:
        here = self._here()
        if here is None or rest != here.name or not here.openable or not here.is_open:
            return None
        here.is_open = False
        return f"You close the {here.name}."

    def _do_take(self, rest: str) -> str | None:
        thing_name, separator, receptacle_name = rest.partition(" from ")
        here = self._here()
        if not separator or here is None or receptacle_name != here.name or self.held is not None:
            return None
        thing = self.things.get(thing_name)
        if thing is None or thing.location != here.name or thing.is_lamp or not here.is_open:
            return None
        here.contents.remove(thing_name)
        thing.location = None
        self.held = thing_name
        return f"You pick up the {thing_name} from the {here.name}."

    def _do_put(self, rest: str) -> str | None:
        thing_name, separator, receptacle_name = rest.partition(" in/on ")
        here = self._here()
        if not separator or here is None or receptacle_name != here.name:
            return None
        if self.held is None or thing_name != self.held or not here.is_open:
            return None
        self.things[thing_name].location = here.name
        here.contents.append(thing_name)
        self.held = None
        if here.kind == self.target_type and self.placement_goal_holds():
            self.won = True
        return f"You put the {thing_name} in/on the {here.name}."

    def _process(self, verb: str, rest: str) -> str | None:
        thing_name, separator, receptacle_name = rest.partition(" with ")
        here = self._here()
        if not separator or here is None or receptacle_name != here.name:
            return None
        if self.held is None or thing_name != self.held or here.kind != APPLIANCE_FOR_VERB[verb]:
            return None
        states = self.things[thing_name].states
        states.add(verb)
        # Heating undoes cooling and the reverse; cleanliness survives both.
        if verb == "heat":
            states.discard("cool")
        elif verb == "cool":
            states.discard("heat")
        return f"You {verb} the {thing_name} using the {here.name}."

    def _do_clean(self, rest: str) -> str | None:
        return self._process("clean", rest)

    def _do_heat(self, rest: str) -> str | None:
        return self._process("heat", rest)

    def _do_cool(self, rest: str) -> str | None:
        return self._process("cool", rest)

    def _do_use(self, rest: str) -> str | None:
        lamp = self.things.get(rest)
        if lamp is None or not lamp.is_lamp or lamp.location != self.location:
            return None
        self.lamps_on.add(lamp.name)
        if self.task_type == "look_at_obj_in_light" and self.held is not None:
            if self.things[self.held].kind == self.object_type:
                self.won = True
        return f"You turn on the {lamp.name}."

    def _do_examine(self, rest: str) -> str | None:
        here = self._here()
        if here is not None and rest == here.name:
            return self.describe_receptacle(here)
        if self.held is not None and rest == self.held:
            return self.describe_thing(self.things[self.held])
        return None

    _handlers = {
        "look": _do_look,
        "inventory": _do_inventory,
        "go": _do_go,
        "open": _do_open,
        "close": _do_close,
        "take": _do_take,
        "put": _do_put,
        "clean": _do_clean,
        "heat": _do_heat,
        "cool": _do_cool,
        "use": _do_use,
        "examine": _do_examine,
    }

    # ----- admissible actions -------------------------------------------------------------

    def admissible_actions(self) -> list[str]:
        """Every command that execute() would not answer with NOTHING_HAPPENS, sorted."""
        if self._admissible is None:
            self._admissible = self._list_admissible()
        return list(self._admissible)

    def _list_admissible(self) -> list[str]:
        actions = ["inventory", "look"]
        actions.extend(
            command for name, command in self._goto_actions.items() if name != self.location
        )
        held = self.held
        if held is not None:
            actions.append(f"examine {held}")
        here = self._here()
        if here is not None:
            actions.append(f"examine {here.name}")
            if here.openable:
                actions.append(f"{'close' if here.is_open else 'open'} {here.name}")
            if here.is_open:
                for name in here.contents:
                    if self.things[name].is_lamp:
                        actions.append(f"use {name}")
                    elif held is None:
                        actions.append(f"take {name} from {here.name}")
                if held is not None:
                    actions.append(f"put {held} in/on {here.name}")
            verb = VERB_FOR_APPLIANCE.get(here.kind)
            if verb is not None and held is not None:
                actions.append(f"{verb} {held} with {here.name}")
        actions.sort()
        return actions


def normalise(action: str) -> str:
    """Lower-case and collapse whitespace, so " Go  to Cabinet 1 " reads as "go to cabinet 1"."""
    return " ".join(action.lower().split())


class HouseholdEpisode(Episode):
    """One playable household task; reset() rebuilds the initial world from the blueprint."""

    def __init__(self, blueprint: TaskBlueprint) -> None:
        self.blueprint = blueprint
        self.task = TaskSpec(
            env="household",
            split=blueprint.split,
            task_id=blueprint.task_id,
            task_type=blueprint.task_type,
            goal=blueprint.goal,
            max_turns=MAX_TURNS,
            extra={
                "layout": blueprint.layout.layout_id,
                "room": blueprint.layout.room,
                "object_type": blueprint.object_type,
                "target_type": blueprint.target_type,
            },
        )
        self.world = HouseholdWorld(blueprint)

    def _outcome(self, observation: str) -> StepOutcome:
        won = self.world.won
        return StepOutcome(
            observation=observation,
            done=won,
            won=won,
            score=1.0 if won else 0.0,
            admissible_actions=self.world.admissible_actions(),
        )

    def reset(self) -> StepOutcome:
        self.world = HouseholdWorld(self.blueprint)
        return self._outcome(self.world.initial_observation())

    def step(self, action: str) -> StepOutcome:
        return self._outcome(self.world.execute(normalise(action)))

    def admissible_actions(self) -> list[str]:
        return self.world.admissible_actions()

    def expert_action(self) -> str | None:
        return next_expert_action(self.world)

    def expert_steps_left(self) -> int | None:
        """Steps the expert needs from here, found by playing it on a copy of the world."""
        # The blueprint is shared and never mutated; everything else is copied.
        world = copy.deepcopy(self.world, {id(self.blueprint): self.blueprint})
        steps = 0
        while not world.won and steps < 4 * MAX_TURNS:
            action = next_expert_action(world)
            if action is None:
                break
            world.execute(action)
            steps += 1
        return steps
