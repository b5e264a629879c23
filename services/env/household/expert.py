"""The expert: the next good action from any household state, read off the hidden state.

It replans from scratch at every call (no script), so states reached by a noisy
policy can be labelled with it. The plan is the short one a person would follow:
fetch an object of the goal type (open its receptacle if closed), clean / heat /
cool it at the sinkbasin / microwave / fridge if the task asks, then carry it to
a receptacle of the goal type (open it if closed) and put it there, or, for
look_at_obj_in_light, carry it to the lamp and use the lamp. Anything else in
hand is put down first, where the expert is or where it is going next.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.env.household.catalog import APPLIANCE_FOR_VERB

if TYPE_CHECKING:
    from services.env.household.world import HouseholdWorld, Receptacle, Thing


def _trip_cost(world: HouseholdWorld, receptacle: Receptacle) -> int:
    """Steps to stand at ``receptacle`` with it open."""
    return (receptacle.name != world.location) + (not receptacle.is_open)


def _go_open_then(world: HouseholdWorld, receptacle: Receptacle, action: str) -> str:
    if receptacle.name != world.location:
        return f"go to {receptacle.name}"
    if not receptacle.is_open:
        return f"open {receptacle.name}"
    return action


def _targets(world: HouseholdWorld) -> list[Receptacle]:
    return [r for r in world.receptacles.values() if r.kind == world.target_type]


def _anchor(world: HouseholdWorld) -> Receptacle | None:
    """For pick_two: the target receptacle already holding the most goal objects.

    Ties break by name only (not by where the agent stands), so the choice does not
    flip as the agent walks, which would make it shuttle between two receptacles.
    """
    if world.needed_count < 2:
        return None
    counted = [(world.count_in(r), r.name, r) for r in _targets(world)]
    best = min(counted, key=lambda item: (-item[0], item[1]), default=None)
    return best[2] if best is not None and best[0] > 0 else None


def _destination(world: HouseholdWorld) -> Receptacle:
    anchor = _anchor(world)
    if anchor is not None:
        return anchor
    return min(_targets(world), key=lambda r: (_trip_cost(world, r), r.name))


def _best_candidate(world: HouseholdWorld) -> Thing:
    """The cheapest goal-type object to fetch, not counting those already in place."""
    anchor = _anchor(world)
    skip = set(anchor.contents) if anchor is not None else set()

    def cost(thing: Thing) -> tuple[int, str]:
        receptacle = world.receptacles[thing.location]  # type: ignore[index]
        processing = 0 if world.required_verb is None or world.satisfies(thing) else 2
        return (_trip_cost(world, receptacle) + processing, thing.name)

    candidates = [
        thing
        for thing in world.things.values()
        if thing.kind == world.object_type and thing.location is not None and thing.name not in skip
    ]
    return min(candidates, key=cost)


def _lamp(world: HouseholdWorld) -> Thing:
    return next(thing for thing in world.things.values() if thing.is_lamp)


def _deliver(world: HouseholdWorld, held: Thing) -> str:
    """The next step with a goal-type object in hand."""
    if world.task_type == "look_at_obj_in_light":
        lamp = _lamp(world)
        if world.location != lamp.location:
            return f"go to {lamp.location}"
        return f"use {lamp.name}"
    verb = world.required_verb
    if verb is not None and verb not in held.states:
        appliances = [r for r in world.receptacles.values() if r.kind == APPLIANCE_FOR_VERB[verb]]
        appliance = min(appliances, key=lambda r: (r.name != world.location, r.name))
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
    if held is not None:
        here = world.receptacles.get(world.location) if world.location is not None else None
        if here is not None and here.is_open:
            return f"put {held.name} in/on {here.name}"
        # Put it down where the next object is, which the expert must visit anyway.
        source = world.receptacles[_best_candidate(world).location]  # type: ignore[index]
        return _go_open_then(world, source, f"put {held.name} in/on {source.name}")
    thing = _best_candidate(world)
    source = world.receptacles[thing.location]  # type: ignore[index]
    return _go_open_then(world, source, f"take {thing.name} from {source.name}")
