"""The expert: the next action from any household state, using only what the agent has seen.

Small models learn to act by imitating this expert with little or no history in
context, so every action it takes must be predictable from what the agent has
observed: it never reads where an unseen object lies. It replans from scratch at
every call (no script), so states reached by a noisy policy can be labelled too.

WHAT IT KNOWS. The world records which receptacles' contents the agent has seen
(``HouseholdWorld.observed``: it arrived at one while it was open or open-topped,
or opened it). An object's location is known if the agent holds it or the
receptacle holding it has been observed; objects move only when the agent moves
them, so what was seen stays true. Besides that, the expert uses only the task,
the room's receptacle list, its own position and what it holds, and the catalog's
fixed rules of where objects may start.

SEARCH ORDER. The receptacles that may hold an object at the start are those of
its host types (catalog.ROOM_OBJECTS), except the goal's target type, where the
task object never starts. They are searched in the order the room description
names them, e.g. "cabinet 2, cabinet 1, countertop 1, drawer 1, ...": a search
walks down the list the agent read on arrival. The lamp is searched for the same way among the
desks, dressers and sidetables.

THE PLAN, in order of need:

1. Holding an object of the goal type: clean / heat / cool it at the sinkbasin /
   microwave / fridge (the one it stands at, else the lowest-numbered) if the task
   asks and it is not yet; then go to a target
   receptacle (for pick_two the one already holding a goal object, else the one
   the agent stands at, else the lowest-numbered), open it if closed, and put it
   there; or, for look_at_obj_in_light, go to the lamp (searching for it first if
   it has not been seen) and use it.
2. Otherwise fetch: if a goal object's location is known (and it is not already in
   its final place, the pick_two target), go there, open it if closed, take it,
   preferring one where the agent stands, then an already processed one, then
   search order. Otherwise search: go to the first unobserved receptacle in search
   order and open it if closed (if the agent stands at another unobserved one of
   them, which is then closed, open that one rather than walk on).
3. Holding anything else: put it down where the agent stands if that is open,
   otherwise carry it to the receptacle of step 2 and put it down there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.env.household.catalog import APPLIANCE_FOR_VERB, receptacle_number

if TYPE_CHECKING:
    from services.env.household.world import HouseholdWorld, Receptacle, Thing


def _known_location(world: HouseholdWorld, thing: Thing) -> str | None:
    """The receptacle holding ``thing`` if the agent has seen it there, else None."""
    location = thing.location
    return location if location is not None and location in world.observed else None


def _go_open_then(world: HouseholdWorld, receptacle: Receptacle, action: str) -> str:
    if receptacle.name != world.location:
        return f"go to {receptacle.name}"
    if not receptacle.is_open:
        return f"open {receptacle.name}"
    return action


def _search_step(world: HouseholdWorld, receptacle: Receptacle) -> str:
    """Look into an unobserved receptacle: walk there, or open it when standing at it.

    Standing at an unobserved receptacle means it is closed (arriving at an open one
    observes it), so opening is the step that shows its contents.
    """
    if receptacle.name != world.location:
        return f"go to {receptacle.name}"
    return f"open {receptacle.name}"


def _next_to_search(world: HouseholdWorld, order: tuple[str, ...]) -> Receptacle:
    """The receptacle to look into next when searching ``order`` (see SEARCH ORDER)."""
    observed = world.observed
    # Standing at an unobserved one: opening it costs one step, walking back later two.
    if world.location in order and world.location not in observed:
        return world.receptacles[world.location]
    for name in order:
        if name not in observed:
            return world.receptacles[name]
    # Unreachable when the catalog's start rules hold (every start spot is in ``order``
    # and the agent sees wherever it puts things), but stay total: look everywhere else.
    for name in world.receptacle_names:
        if name not in observed:
            return world.receptacles[name]
    raise RuntimeError("every receptacle is observed, yet the object was not seen")


def _targets(world: HouseholdWorld) -> list[Receptacle]:
    """Receptacles of the goal's target type, lowest-numbered first."""
    targets = [r for r in world.receptacles.values() if r.kind == world.target_type]
    return sorted(targets, key=lambda r: receptacle_number(r.name))


def _anchor(world: HouseholdWorld) -> Receptacle | None:
    """For pick_two: the observed target holding the most goal objects (lowest number on ties).

    Ties break by number only (not by where the agent stands), so the choice does not
    flip as the agent walks, which would make it shuttle between two receptacles.
    """
    if world.needed_count < 2:
        return None
    best: Receptacle | None = None
    best_count = 0
    for receptacle in _targets(world):
        if receptacle.name in world.observed:
            count = world.count_in(receptacle)
            if count > best_count:
                best, best_count = receptacle, count
    return best


def _destination(world: HouseholdWorld) -> Receptacle:
    """Where a ready goal object goes: the pick_two anchor, the target here, or the first."""
    anchor = _anchor(world)
    if anchor is not None:
        return anchor
    here = world.receptacles.get(world.location) if world.location is not None else None
    if here is not None and here.kind == world.target_type:
        return here
    return _targets(world)[0]


def _next_source(world: HouseholdWorld) -> tuple[Receptacle, Thing | None]:
    """Where the next goal object comes from: (receptacle, the known object to take there).

    The object is None when no goal object's location is known and not in its final
    place: the receptacle is then the next one to search.
    """
    anchor = _anchor(world)
    order = world.object_search_order
    known: list[tuple[tuple[bool, bool, int, str], str, Thing]] = []
    for thing in world.things.values():
        if thing.kind != world.object_type:
            continue
        location = _known_location(world, thing)
        if location is None or (anchor is not None and location == anchor.name):
            continue
        rank = order.index(location) if location in order else len(order)
        key = (location != world.location, not world.satisfies(thing), rank, thing.name)
        known.append((key, location, thing))
    if known:
        _, location, thing = min(known, key=lambda item: item[0])
        return world.receptacles[location], thing
    return _next_to_search(world, order), None


def _lamp(world: HouseholdWorld) -> Thing:
    return next(thing for thing in world.things.values() if thing.is_lamp)


def _deliver(world: HouseholdWorld, held: Thing) -> str:
    """The next step with a goal-type object in hand."""
    if world.task_type == "look_at_obj_in_light":
        lamp = _lamp(world)
        lamp_at = _known_location(world, lamp)
        if lamp_at is None:
            return _search_step(world, _next_to_search(world, world.lamp_search_order))
        if world.location != lamp_at:
            return f"go to {lamp_at}"
        return f"use {lamp.name}"
    verb = world.required_verb
    if verb is not None and verb not in held.states:
        appliances = [r for r in world.receptacles.values() if r.kind == APPLIANCE_FOR_VERB[verb]]
        appliance = min(
            appliances, key=lambda r: (r.name != world.location, receptacle_number(r.name))
        )
        if appliance.name != world.location:
            return f"go to {appliance.name}"
        return f"{verb} {held.name} with {appliance.name}"
    destination = _destination(world)
    return _go_open_then(world, destination, f"put {held.name} in/on {destination.name}")


def next_expert_action(world: HouseholdWorld) -> str | None:
    """The expert's next command for ``world``; None once the task is won."""
    if world.won:
        return None
    held = world.things[world.held] if world.held is not None else None
    if held is not None and held.kind == world.object_type:
        return _deliver(world, held)
    source, thing = _next_source(world)
    if held is not None:
        here = world.receptacles.get(world.location) if world.location is not None else None
        if here is not None and here.is_open:
            return f"put {held.name} in/on {here.name}"
        # Carry it to where the expert goes next anyway and put it down there.
        return _go_open_then(world, source, f"put {held.name} in/on {source.name}")
    if thing is None:
        return _search_step(world, source)
    return _go_open_then(world, source, f"take {thing.name} from {source.name}")
