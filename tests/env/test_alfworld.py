"""ALFWorld's real engine behind the env service: generated games, and the ALFWORLD_DATA path.

Every game here is played by the real TextWorld engine with ALFWorld's wrappers and
handcoded expert, through a real uvicorn on loopback and the EnvClient. Games are
generated once per test session into a temporary cache.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("alfworld", reason="alfworld is not installed: pip install -e '.[alfworld]'")

from client.env import EnvClient, RetryPolicy  # noqa: E402
from client.protocol import CreateSessionRequest  # noqa: E402
from services.env.alfworld import AlfworldEnvironment  # noqa: E402
from services.env.alfworld.generate import (  # noqa: E402
    CACHE_ENV_VAR,
    SPLIT_SIZES,
    TASK_TYPES,
    VALID_UNSEEN_FLOOR_PLANS,
    default_cache_dir,
    draft_task,
    generate_games,
    write_game,
)
from services.env.app import create_app  # noqa: E402
from services.env.registry import get_family  # noqa: E402
from services.env.settings import EnvSettings  # noqa: E402

GAMES_PER_TYPE = 2
ONE_TRY = RetryPolicy(attempts=1)


@pytest.fixture(scope="session")
def generated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The value of $SAGE_OPD_ALFWORLD_GENERATED_CACHE for the whole session."""
    return tmp_path_factory.mktemp("alfworld-generated")


@pytest.fixture
def families_rebuilt() -> Iterator[None]:
    """Families are built once per process: rebuild them around a test that moves data."""
    get_family.cache_clear()
    yield
    get_family.cache_clear()


def serve_env(serve, name: str) -> str:
    return serve(create_app(EnvSettings(environments=name)))


async def play_expert_through_service(client: EnvClient, env: str, split: str, task_id: int):
    """Open a session, follow the expert until the episode ends; (task, last result, moves)."""
    created = await client.create_session(env=env, split=split, task_id=task_id)
    result, moves = created.first, []
    while not result.done:
        action = await client.expert_action(created.session_id)
        assert action is not None, f"{env}/{split}/{task_id}: the expert gave up after {moves}"
        assert action in result.admissible_actions
        moves.append(action)
        result = await client.step(created.session_id, action)
    if result.won:
        assert await client.expert_action(created.session_id) is None
    await client.close_session(created.session_id)
    return created, result, moves


async def test_expert_wins_generated_games_of_all_six_task_types(
    serve, generated_cache: Path, monkeypatch: pytest.MonkeyPatch, families_rebuilt: None
) -> None:
    monkeypatch.setenv(CACHE_ENV_VAR, str(generated_cache))
    url = serve_env(serve, "alfworld-generated")
    wins: Counter[str] = Counter()
    async with EnvClient(url, retry=ONE_TRY, timeout_s=300) as client:
        assert await client.split_size("alfworld-generated", "valid_seen") == 140
        for task_id in range(GAMES_PER_TYPE * len(TASK_TYPES)):
            created, result, moves = await play_expert_through_service(
                client, "alfworld-generated", "valid_seen", task_id
            )
            task = created.task
            assert task.env == "alfworld-generated"  # never reported as ALFWorld's own
            assert task.task_type == TASK_TYPES[task_id % len(TASK_TYPES)]
            assert created.first.observation.startswith("-= Welcome to TextWorld, ALFRED! =-")
            assert created.first.observation.endswith(f"Your task is to: {task.goal}")
            assert result.won and result.score == 1.0 and not result.truncated
            assert len(moves) <= task.max_turns
            wins[task.task_type] += 1
    print("expert wins per task type:", dict(wins))
    assert wins == {task_type: GAMES_PER_TYPE for task_type in TASK_TYPES}


async def test_sessions_stepped_in_one_batch_each_play_their_own_game(
    serve, generated_cache: Path, monkeypatch: pytest.MonkeyPatch, families_rebuilt: None
) -> None:
    # One game of each task type, stepped side by side (the service runs a batch's items
    # in worker threads): each session's expert must make exactly the moves it makes
    # alone, which generation recorded as the game's walkthrough.
    monkeypatch.setenv(CACHE_ENV_VAR, str(generated_cache))
    url = serve_env(serve, "alfworld-generated")
    requests = [
        CreateSessionRequest(env="alfworld-generated", split="valid_seen", task_id=task_id)
        for task_id in range(len(TASK_TYPES))
    ]
    async with EnvClient(url, retry=ONE_TRY, timeout_s=300) as client:
        created = [item.result for item in await client.create_sessions(requests)]
        assert all(created)
        walkthroughs = {
            c.session_id: json.loads(
                (default_cache_dir() / c.task.extra["game"] / "game.tw-pddl").read_text()
            )["walkthrough"]
            for c in created
        }
        moves: dict[str, list[str]] = {sid: [] for sid in walkthroughs}
        live = set(walkthroughs)
        while live:
            actions = {sid: await client.expert_action(sid) for sid in sorted(live)}
            for item in await client.step_many(actions):
                assert item.result is not None, item.error
                moves[item.session_id].append(actions[item.session_id])
                if item.result.done:
                    assert item.result.won
                    live.discard(item.session_id)
        assert moves == walkthroughs
        await client.close_sessions(list(walkthroughs))


def copy_as_downloaded(game_file: Path, data: Path, split: str, trial: str) -> Path:
    """Place a generated game where alfworld-download puts ALFWorld's: json_2.1.1/<split>/
    <task folder>/<trial>/, with the domain and grammar in logic/."""
    target = data / "json_2.1.1" / split / game_file.parent.parent.name / trial
    shutil.copytree(game_file.parent, target)
    shutil.copytree(game_file.parents[4] / "logic", data / "logic", dirs_exist_ok=True)
    return target / "game.tw-pddl"


async def test_real_alfworld_family_plays_games_found_through_alfworld_data(
    serve,
    generated_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    families_rebuilt: None,
) -> None:
    # A small generated game (a bedroom or living room: look_at_obj_in_light) stands in
    # for a downloaded one; a second copy marked unsolvable must be skipped, as ALFWorld
    # skips its own unsolvable games.
    monkeypatch.setenv(CACHE_ENV_VAR, str(generated_cache))
    (game_file,) = generate_games(default_cache_dir(), "valid_unseen", [1])
    data = tmp_path / "alfworld-data"
    copy_as_downloaded(game_file, data, "valid_unseen", "trial_T1")
    unsolvable = copy_as_downloaded(game_file, data, "valid_unseen", "trial_T2")
    unsolvable.write_text(json.dumps({**json.loads(unsolvable.read_text()), "solvable": False}))
    traj = json.loads(game_file.with_name("traj_data.json").read_text())
    monkeypatch.setenv("ALFWORLD_DATA", str(data))

    url = serve_env(serve, "alfworld")
    async with EnvClient(url, retry=ONE_TRY, timeout_s=300) as client:
        (info,) = (await client.environments()).environments
        assert info.splits == {"train": 0, "valid_seen": 0, "valid_unseen": 1}

        created = await client.create_session(env="alfworld", split="valid_unseen", task_id=0)
        assert created.task.env == "alfworld"
        assert created.task.task_type == traj["task_type"] == "look_at_obj_in_light"
        assert created.task.extra["game"].endswith("trial_T1")
        nothing = await client.step(created.session_id, "dance with the lamp")
        assert nothing.observation == "Nothing happens." and not nothing.done
        await client.close_session(created.session_id)

        created, result, moves = await play_expert_through_service(
            client, "alfworld", "valid_unseen", 0
        )
        assert f"Your task is to: {created.task.goal}" in created.first.observation
        assert result.won and result.score == 1.0
        assert moves == json.loads(game_file.read_text())["walkthrough"]


def test_alfworld_family_without_games_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="alfworld-generated"):
        AlfworldEnvironment(root=tmp_path)


def test_generated_games_are_the_same_files_in_every_generation(tmp_path: Path) -> None:
    for task_id in range(len(TASK_TYPES)):
        first = write_game(tmp_path / "a", draft_task("train", task_id))
        second = write_game(tmp_path / "b", draft_task("train", task_id))
        assert first.relative_to(tmp_path / "a") == second.relative_to(tmp_path / "b")
        for name in ("game.tw-pddl", "traj_data.json"):
            assert first.with_name(name).read_bytes() == second.with_name(name).read_bytes()


def test_generated_game_files_have_alfworlds_layout(tmp_path: Path) -> None:
    draft = draft_task("valid_unseen", 3)
    game_file = write_game(tmp_path, draft)
    folder = game_file.parent.parent.name
    assert game_file.relative_to(tmp_path).parts[:2] == ("json_2.1.1", "valid_unseen")
    assert folder.startswith(f"{draft.task_type}-{draft.object_target}-None-")
    assert folder.endswith(f"-{draft.floor_plan.number}")
    assert {p.name for p in (tmp_path / "logic").iterdir()} == {"alfred.pddl", "alfred.twl2"}
    game = json.loads(game_file.read_text())
    assert set(game) == {"pddl_domain", "grammar", "pddl_problem", "solvable", "walkthrough"}
    assert f"Your task is to: {draft.goal}." in game["grammar"]
    traj = json.loads(game_file.with_name("traj_data.json").read_text())
    assert traj["task_type"] == "pick_heat_then_place_in_recep"
    assert traj["scene"]["floor_plan"] == f"FloorPlan{draft.floor_plan.number}"
    assert traj["pddl_params"]["object_target"] == draft.object_target


def test_valid_unseen_uses_only_floor_plans_that_train_and_valid_seen_never_use() -> None:
    plans: dict[str, set[int]] = {}
    types: dict[str, set[str]] = {}
    for split in SPLIT_SIZES:
        drafts = [draft_task(split, task_id) for task_id in range(min(300, SPLIT_SIZES[split]))]
        plans[split] = {draft.floor_plan.number for draft in drafts}
        types[split] = {draft.task_type for draft in drafts}
    assert plans["valid_unseen"] == VALID_UNSEEN_FLOOR_PLANS
    assert not (plans["train"] | plans["valid_seen"]) & VALID_UNSEEN_FLOOR_PLANS
    assert all(task_types == set(TASK_TYPES) for task_types in types.values())
