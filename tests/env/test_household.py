"""Specification of the embedded household world (services/env/household)."""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from services.env.household import HouseholdEnvironment, task_combination
from services.env.household.catalog import (
    APPLIANCE_FOR_VERB,
    LAMP_HOSTS,
    ROOM_OBJECTS,
    SPLIT_SIZES,
    TASK_TYPES,
    Layout,
    TaskBlueprint,
    build_task,
    layouts,
    object_search_order,
)
from services.env.household.world import NOTHING_HAPPENS, HouseholdEpisode, HouseholdWorld

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = HouseholdEnvironment()

KITCHEN = Layout(
    layout_id="test-kitchen",
    room="kitchen",
    side="seen",
    receptacles=(
        "cabinet 2",
        "cabinet 1",
        "countertop 1",
        "fridge 1",
        "microwave 1",
        "sinkbasin 1",
    ),
)
BEDROOM = Layout(
    layout_id="test-bedroom",
    room="bedroom",
    side="seen",
    receptacles=("bed 1", "desk 1", "drawer 1", "shelf 1"),
)


def kitchen_episode(task_type: str = "pick_clean_then_place") -> HouseholdEpisode:
    """A hand-written kitchen: apple on the countertop, cup in closed cabinet 1."""
    blueprint = TaskBlueprint(
        split="train",
        task_id=0,
        task_type=task_type,
        layout=KITCHEN,
        object_type="apple",
        target_type="cabinet",
        goal="put a clean apple in cabinet.",
        placements=(
            ("apple 1", "countertop 1"),
            ("bread 1", "countertop 1"),
            ("cup 1", "cabinet 1"),
        ),
    )
    episode = HouseholdEpisode(blueprint)
    episode.reset()
    return episode


def bedroom_lamp_episode() -> HouseholdEpisode:
    blueprint = TaskBlueprint(
        split="train",
        task_id=0,
        task_type="look_at_obj_in_light",
        layout=BEDROOM,
        object_type="book",
        target_type="desklamp",
        goal="look at book under the desklamp.",
        placements=(("book 1", "bed 1"), ("desklamp 1", "desk 1"), ("pen 1", "shelf 1")),
    )
    episode = HouseholdEpisode(blueprint)
    episode.reset()
    return episode


def play(episode: HouseholdEpisode, actions: list[str]) -> str:
    observation = ""
    for action in actions:
        observation = episode.step(action).observation
    return observation


def play_expert(split: str, task_id: int) -> tuple[bool, int]:
    """Follow the expert from reset; (won, turns). Asserts each action is admissible."""
    episode = ENV.make(split, task_id)
    episode.reset()
    for turn in range(1, episode.task.max_turns + 1):
        action = episode.expert_action()
        assert action in episode.admissible_actions(), (split, task_id, action)
        if episode.step(action).won:
            return True, turn
    return False, episode.task.max_turns


# ----- expert and random policy ---------------------------------------------------------


@pytest.mark.parametrize(
    ("split", "task_ids"),
    [
        ("valid_seen", range(SPLIT_SIZES["valid_seen"])),
        ("valid_unseen", range(SPLIT_SIZES["valid_unseen"])),
        ("train", range(SPLIT_SIZES["train"])),
    ],
)
def test_expert_wins_every_task_within_max_turns(split: str, task_ids: range) -> None:
    failures = [task_id for task_id in task_ids if not play_expert(split, task_id)[0]]
    assert failures == []


def test_expert_recovers_from_states_reached_by_random_actions() -> None:
    rng = random.Random(1)
    for task_id in range(0, SPLIT_SIZES["train"], 5):
        episode = ENV.make("train", task_id)
        episode.reset()
        for _ in range(rng.randint(0, 20)):
            if episode.step(rng.choice(episode.admissible_actions())).won:
                break
        # From any state the expert's plan is short: a search and at most two object trips.
        for _ in range(episode.task.max_turns):
            action = episode.expert_action()
            if action is None:
                break
            assert action in episode.admissible_actions()
            episode.step(action)
        assert episode.expert_action() is None, task_id


def _kind(name: str) -> str:
    return name.rsplit(" ", 1)[0]


def _in_search_order(layout: Layout, kinds: set[str]) -> list[str]:
    """The documented search order, computed afresh: as the room description lists them."""
    return [name for name in layout.receptacles if _kind(name) in kinds]


def _first_unobserved(world: HouseholdWorld, order: list[str]) -> str | None:
    return next((name for name in order if name not in world.observed), None)


def _assert_no_peeking(world: HouseholdWorld, action: str) -> None:
    """The expert's "go to R" / "open R" must be explained by what the agent has seen."""
    verb, _, name = action.partition(" to " if action.startswith("go to ") else " ")
    if verb not in ("go", "open"):
        return
    layout = world.blueprint.layout
    if world.held is not None and _kind(world.held) == world.object_type:
        if world.task_type == "look_at_obj_in_light":
            lamp = next(thing for thing in world.things.values() if thing.is_lamp)
            if lamp.location in world.observed:
                assert name == lamp.location, action
            else:  # the lamp is searched for like an object
                lamp_order = _in_search_order(layout, set(LAMP_HOSTS))
                assert name == _first_unobserved(world, lamp_order), action
        else:  # the object goes to its appliance, then to a target
            verb_for_task = world.required_verb
            appliance = APPLIANCE_FOR_VERB[verb_for_task] if verb_for_task else None
            assert _kind(name) in (world.target_type, appliance), action
        return
    if name in world.observed:  # fetching: it goes back only where it saw a goal object
        holds = {_kind(thing) for thing in world.receptacles[name].contents}
        assert world.object_type in holds, action
        return
    # Searching: only while no goal object is seen (except in targets, where pick_two
    # gathers them), and only the first unobserved candidate or the closed one it is at.
    goal_things = [t for t in world.things.values() if t.kind == world.object_type]
    seen = {t.location for t in goal_things if t.location in world.observed}
    assert all(_kind(spot) == world.target_type for spot in seen), (action, seen)
    hosts = set(ROOM_OBJECTS[layout.room][world.object_type])
    if world.task_type != "look_at_obj_in_light":
        hosts.discard(world.target_type)
    order = _in_search_order(layout, hosts)
    at_candidate = verb == "open" and name == world.location and name in order
    assert at_candidate or name == _first_unobserved(world, order), action


def test_expert_never_looks_anywhere_but_the_next_search_spot_or_a_known_place() -> None:
    rng = random.Random(4)
    for task_id in range(0, SPLIT_SIZES["train"], 12):
        for noise in (0, 5):  # from reset, and from a state a noisy policy reached
            episode = ENV.make("train", task_id)
            episode.reset()
            for _ in range(noise):
                episode.step(rng.choice(episode.admissible_actions()))
            for _ in range(episode.task.max_turns):
                action = episode.expert_action()
                if action is None:
                    break
                _assert_no_peeking(episode.world, action)
                episode.step(action)


def test_expert_wins_within_max_turns_after_five_random_actions() -> None:
    rng = random.Random(5)
    failures = []
    for task_id in rng.sample(range(SPLIT_SIZES["train"]), 300):
        episode = ENV.make("train", task_id)
        episode.reset()
        won = False
        for turn in range(episode.task.max_turns):
            noisy = turn < 5
            action = rng.choice(episode.admissible_actions()) if noisy else episode.expert_action()
            if episode.step(action).won:
                won = True
                break
        if not won:
            failures.append(task_id)
    assert failures == []


def _with_object_moved(blueprint: TaskBlueprint, thing: str, spot: str) -> TaskBlueprint:
    placements = [(name, spot if name == thing else where) for name, where in blueprint.placements]
    return dataclasses.replace(blueprint, placements=tuple(sorted(placements)))


def test_expert_action_depends_only_on_what_was_observed() -> None:
    """Two worlds that differ only where the agent has not looked get the same actions."""
    rng = random.Random(6)
    pairs = 0
    for task_id in range(0, SPLIT_SIZES["train"], 7):
        blueprint = build_task("train", task_id)
        spots = dict(blueprint.placements)
        thing = next(name for name in spots if _kind(name) == blueprint.object_type)
        order = object_search_order(
            blueprint.layout, blueprint.task_type, blueprint.object_type, blueprint.target_type
        )
        lamp_spots = {where for name, where in spots.items() if _kind(name) == "desklamp"}
        others = [spot for spot in order if spot != spots[thing] and spot not in lamp_spots]
        if not others:
            continue
        first = HouseholdEpisode(blueprint)
        second = HouseholdEpisode(_with_object_moved(blueprint, thing, rng.choice(others)))
        seen_first, seen_second = first.reset(), second.reset()
        assert seen_first == seen_second  # nothing about contents is shown at the start
        pairs += 1
        # While everything observed is the same, so is every expert action.
        while seen_first == seen_second and not seen_first.done:
            action = first.expert_action()
            assert action == second.expert_action(), (task_id, action)
            seen_first, seen_second = first.step(action), second.step(action)
    assert pairs > 400


def test_expert_returns_none_once_won() -> None:
    episode = ENV.make("valid_seen", 0)
    episode.reset()
    while (action := episode.expert_action()) is not None:
        outcome = episode.step(action)
    assert (outcome.done, outcome.won, outcome.score) == (True, True, 1.0)
    assert episode.expert_action() is None


def test_random_admissible_policy_rarely_wins() -> None:
    rng = random.Random(0)
    sample = [("valid_unseen", i) for i in range(SPLIT_SIZES["valid_unseen"])]
    sample += [("train", i) for i in range(200)]
    wins = 0
    for split, task_id in sample:
        episode = ENV.make(split, task_id)
        episode.reset()
        for _ in range(episode.task.max_turns):
            if episode.step(rng.choice(episode.admissible_actions())).won:
                wins += 1
                break
    assert wins / len(sample) < 0.15


# ----- determinism and splits -----------------------------------------------------------

_TRANSCRIPT_SCRIPT = """
from services.env.household import HouseholdEnvironment
env = HouseholdEnvironment()
for split, task_id in [("train", 0), ("train", 1234), ("valid_seen", 17), ("valid_unseen", 99)]:
    episode = env.make(split, task_id)
    print(episode.reset().observation)
    while (action := episode.expert_action()) is not None:
        outcome = episode.step(action)
        print(action, "|", outcome.observation, "|", outcome.admissible_actions)
"""


def test_same_task_builds_identical_text_in_separate_processes() -> None:
    transcripts = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO_ROOT)}
        result = subprocess.run(
            [sys.executable, "-c", _TRANSCRIPT_SCRIPT],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        transcripts.append(result.stdout)
    assert transcripts[0] == transcripts[1]
    assert "Your task is to:" in transcripts[0]


def test_make_ignores_seed() -> None:
    first = ENV.make("train", 5, seed=0)
    second = ENV.make("train", 5, seed=12345)
    assert first.task == second.task
    assert first.reset() == second.reset()


def test_splits_have_the_documented_sizes() -> None:
    assert ENV.splits() == {"train": 3553, "valid_seen": 140, "valid_unseen": 134}


def _all_tasks(split: str) -> list[TaskBlueprint]:
    return [build_task(split, task_id) for task_id in range(SPLIT_SIZES[split])]


def test_splits_share_no_world() -> None:
    canon = {split: {task.canonical() for task in _all_tasks(split)} for split in SPLIT_SIZES}
    assert not canon["train"] & canon["valid_seen"]
    assert not canon["train"] & canon["valid_unseen"]
    assert not canon["valid_seen"] & canon["valid_unseen"]


def test_every_task_type_occurs_in_every_split() -> None:
    for split in SPLIT_SIZES:
        assert {task.task_type for task in _all_tasks(split)} == set(TASK_TYPES), split


def test_valid_unseen_layouts_never_occur_in_train() -> None:
    train_layouts = {task.layout.layout_id for task in _all_tasks("train")}
    unseen_layouts = {task.layout.layout_id for task in _all_tasks("valid_unseen")}
    assert unseen_layouts and not unseen_layouts & train_layouts


def test_valid_unseen_combinations_never_occur_in_train() -> None:
    train = {task_combination("train", i) for i in range(SPLIT_SIZES["train"])}
    unseen = {task_combination("valid_unseen", i) for i in range(SPLIT_SIZES["valid_unseen"])}
    assert unseen and not unseen & train


def test_valid_seen_uses_train_layouts_and_combinations() -> None:
    train = _all_tasks("train")
    seen = _all_tasks("valid_seen")
    assert {t.layout.layout_id for t in seen} <= {t.layout.layout_id for t in train}
    assert {t.combination for t in seen} <= {t.combination for t in train}


def test_task_metadata_names_layout_and_goal() -> None:
    episode = ENV.make("valid_unseen", 0)
    blueprint = build_task("valid_unseen", 0)
    assert episode.task.extra["layout"] == blueprint.layout.layout_id
    assert episode.task.goal == blueprint.goal
    assert episode.task.max_turns == 30
    assert blueprint.layout.layout_id in {layout.layout_id for layout in layouts()}


def test_unknown_split_or_task_id_raises_key_error() -> None:
    for split, task_id in [("test", 0), ("train", -1), ("valid_seen", 140), ("valid_unseen", 134)]:
        with pytest.raises(KeyError):
            ENV.make(split, task_id)


# ----- observations and grammar ---------------------------------------------------------


def test_initial_observation_lists_receptacles_and_goal() -> None:
    observation = kitchen_episode().reset().observation
    assert observation == (
        "-= Welcome to TextWorld, ALFRED! =-\n\n"
        "You are in the middle of a room. Looking quickly around you, you see a cabinet 2, "
        "a cabinet 1, a countertop 1, a fridge 1, a microwave 1, and a sinkbasin 1.\n\n"
        "Your task is to: put a clean apple in cabinet."
    )


def test_world_records_which_receptacles_contents_were_seen() -> None:
    episode = kitchen_episode()
    assert episode.world.observed == set()  # the first observation shows no contents
    episode.step("go to cabinet 1")
    assert episode.world.observed == set()  # closed: nothing seen yet
    play(episode, ["open cabinet 1", "go to countertop 1", "go to fridge 1"])
    assert episode.world.observed == {"cabinet 1", "countertop 1"}
    episode.reset()
    assert episode.world.observed == set()


def test_search_order_follows_the_room_description_without_the_target_type() -> None:
    # Mugs may sit on cabinets, countertops, fridges, microwaves and sinkbasins here;
    # the goal's countertop is left out, as a task object never starts on its target.
    order = object_search_order(KITCHEN, "pick_and_place", "mug", "countertop")
    assert order == ("cabinet 2", "cabinet 1", "fridge 1", "microwave 1", "sinkbasin 1")


def test_unknown_command_does_nothing() -> None:
    episode = kitchen_episode()
    for garbage in ["", "fly to the moon", "go to", "go to cabinet 9", "take", "put apple 1"]:
        assert episode.step(garbage).observation == NOTHING_HAPPENS


def test_taking_an_object_from_elsewhere_does_nothing() -> None:
    episode = kitchen_episode()
    assert episode.step("take apple 1 from countertop 1").observation == NOTHING_HAPPENS
    episode.step("go to sinkbasin 1")
    assert episode.step("take apple 1 from countertop 1").observation == NOTHING_HAPPENS
    assert episode.step("take apple 1 from sinkbasin 1").observation == NOTHING_HAPPENS


def test_arriving_describes_an_open_receptacle_contents() -> None:
    episode = kitchen_episode()
    assert episode.step("go to countertop 1").observation == (
        "You arrive at countertop 1. On the countertop 1, you see a apple 1, and a bread 1."
    )


def test_closed_receptacle_hides_contents_until_opened() -> None:
    episode = kitchen_episode()
    arrival = episode.step("go to cabinet 1").observation
    assert arrival == "You arrive at cabinet 1. The cabinet 1 is closed."
    assert episode.step("take cup 1 from cabinet 1").observation == NOTHING_HAPPENS
    assert "take cup 1 from cabinet 1" not in episode.admissible_actions()
    assert episode.step("open cabinet 1").observation == (
        "You open the cabinet 1. The cabinet 1 is open. In it, you see a cup 1."
    )
    assert episode.step("take cup 1 from cabinet 1").observation == (
        "You pick up the cup 1 from the cabinet 1."
    )


def test_take_then_put_moves_the_object() -> None:
    episode = kitchen_episode()
    play(episode, ["go to countertop 1", "take apple 1 from countertop 1"])
    assert episode.step("inventory").observation == "You are carrying: a apple 1."
    play(episode, ["go to cabinet 2", "open cabinet 2"])
    assert episode.step("put apple 1 in/on cabinet 2").observation == (
        "You put the apple 1 in/on the cabinet 2."
    )
    assert episode.step("inventory").observation == "You are not carrying anything."
    assert episode.step("examine cabinet 2").observation == (
        "The cabinet 2 is open. In it, you see a apple 1."
    )


def test_agent_holds_at_most_one_object() -> None:
    episode = kitchen_episode()
    play(episode, ["go to countertop 1", "take apple 1 from countertop 1"])
    assert episode.step("take bread 1 from countertop 1").observation == NOTHING_HAPPENS
    assert not any(action.startswith("take ") for action in episode.admissible_actions())


def test_putting_into_a_closed_receptacle_does_nothing() -> None:
    episode = kitchen_episode()
    play(episode, ["go to countertop 1", "take apple 1 from countertop 1", "go to cabinet 2"])
    assert episode.step("put apple 1 in/on cabinet 2").observation == NOTHING_HAPPENS


@pytest.mark.parametrize(
    ("verb", "appliance", "word"),
    [
        ("clean", "sinkbasin 1", "clean"),
        ("heat", "microwave 1", "hot"),
        ("cool", "fridge 1", "cool"),
    ],
)
def test_processing_sets_the_object_state(verb: str, appliance: str, word: str) -> None:
    episode = kitchen_episode()
    play(episode, ["go to countertop 1", "take apple 1 from countertop 1"])
    assert episode.step("examine apple 1").observation == "There's nothing special about apple 1."
    episode.step(f"go to {appliance}")
    assert episode.step(f"{verb} apple 1 with {appliance}").observation == (
        f"You {verb} the apple 1 using the {appliance}."
    )
    assert episode.step("examine apple 1").observation == f"This is a {word} apple 1."


def test_processing_needs_the_right_appliance() -> None:
    episode = kitchen_episode()
    play(episode, ["go to countertop 1", "take apple 1 from countertop 1", "go to fridge 1"])
    assert episode.step("clean apple 1 with fridge 1").observation == NOTHING_HAPPENS
    assert episode.step("heat apple 1 with fridge 1").observation == NOTHING_HAPPENS


def test_placing_a_clean_object_in_the_target_type_wins() -> None:
    episode = kitchen_episode()
    play(episode, ["go to countertop 1", "take apple 1 from countertop 1", "go to cabinet 1"])
    episode.step("open cabinet 1")
    unwashed = episode.step("put apple 1 in/on cabinet 1")
    assert (unwashed.done, unwashed.won, unwashed.score) == (False, False, 0.0)
    play(
        episode,
        ["take apple 1 from cabinet 1", "go to sinkbasin 1", "clean apple 1 with sinkbasin 1"],
    )
    play(episode, ["go to cabinet 1"])
    outcome = episode.step("put apple 1 in/on cabinet 1")
    assert (outcome.done, outcome.won, outcome.score) == (True, True, 1.0)


def test_using_the_lamp_while_holding_the_object_wins() -> None:
    episode = bedroom_lamp_episode()
    assert episode.step("use desklamp 1").observation == NOTHING_HAPPENS  # not at the desk
    episode.step("go to desk 1")
    lit = episode.step("use desklamp 1")
    assert (lit.observation, lit.won) == ("You turn on the desklamp 1.", False)
    play(episode, ["go to bed 1", "take book 1 from bed 1", "go to desk 1"])
    outcome = episode.step("use desklamp 1")
    assert (outcome.done, outcome.won, outcome.score) == (True, True, 1.0)


def test_lamp_cannot_be_taken() -> None:
    episode = bedroom_lamp_episode()
    episode.step("go to desk 1")
    assert episode.step("take desklamp 1 from desk 1").observation == NOTHING_HAPPENS
    assert "use desklamp 1" in episode.admissible_actions()


def _every_command(episode: HouseholdEpisode) -> set[str]:
    """Every well-formed command over this world's names, applicable or not."""
    world = episode.world
    receptacles = list(world.receptacles)
    things = list(world.things)
    commands = {"look", "inventory"}
    for receptacle in receptacles:
        commands |= {f"{verb} {receptacle}" for verb in ("go to", "open", "close", "examine")}
        for thing in things:
            commands |= {f"take {thing} from {receptacle}", f"put {thing} in/on {receptacle}"}
            commands |= {f"{verb} {thing} with {receptacle}" for verb in ("clean", "heat", "cool")}
    commands |= {f"{verb} {thing}" for thing in things for verb in ("use", "examine")}
    return commands


def test_admissible_actions_are_exactly_the_commands_that_do_something() -> None:
    rng = random.Random(2)
    for split, task_id in [("train", 3), ("train", 40), ("valid_seen", 7), ("valid_unseen", 11)]:
        episode = ENV.make(split, task_id)
        episode.reset()
        for _ in range(15):
            admissible = episode.admissible_actions()
            assert admissible == sorted(admissible)
            for command in admissible:
                trial = copy.deepcopy(episode)
                assert trial.step(command).observation != NOTHING_HAPPENS, command
            # An inapplicable command changes nothing, so it can be tried on the episode itself.
            for command in _every_command(episode) - set(admissible):
                assert episode.step(command).observation == NOTHING_HAPPENS, command
            assert episode.admissible_actions() == admissible
            episode.step(rng.choice(admissible))


def test_importing_the_world_does_not_import_torch() -> None:
    check = "import sys, services.env.household; assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", check], cwd=REPO_ROOT, env=env, check=True)


def test_expert_steps_left_counts_down_along_the_experts_own_plan() -> None:
    family = HouseholdEnvironment()
    for task_id in range(0, 60, 7):
        episode = family.make("valid_seen", task_id)
        episode.reset()
        left = episode.expert_steps_left()
        taken = 0
        while (action := episode.expert_action()) is not None:
            assert episode.expert_steps_left() == left - taken
            episode.step(action)
            taken += 1
        assert taken == left and episode.expert_steps_left() == 0


def test_a_wasted_or_harmful_action_does_not_bring_the_goal_closer() -> None:
    episode = HouseholdEnvironment().make("train", 3)
    episode.reset()
    before = episode.expert_steps_left()
    episode.step("inventory")  # changes nothing
    assert episode.expert_steps_left() == before
