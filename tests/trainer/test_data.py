"""Training data gathered through a real env service: noise, near misses and labels."""

from __future__ import annotations

import asyncio
import random
import re

from client.env import EnvClient
from services.env.app import create_app as create_env_app
from services.env.settings import EnvSettings
from trainer.data import NOTHING_HAPPENS, gather, near_miss_action


def test_a_near_miss_changes_exactly_one_number() -> None:
    rng = random.Random(0)
    action = "take mug 2 from shelf 1"
    for _ in range(50):
        slip = near_miss_action(action, rng)
        assert slip is not None and slip != action
        assert re.sub(r"\d+", "#", slip) == re.sub(r"\d+", "#", action)
        pairs = zip(re.findall(r"\d+", action), re.findall(r"\d+", slip), strict=True)
        changed = [a != b for a, b in pairs]
        assert sum(changed) == 1
    assert near_miss_action("look", rng) is None
    assert near_miss_action(None, rng) is None


def _play(url: str, noise: float, near_miss: float) -> list:
    async def run() -> list:
        async with EnvClient(url) as env:
            return await gather(
                env, list(range(6)), noise, 0, max_turns=8, progress=False, near_miss=near_miss
            )

    return asyncio.run(run())


def test_noisy_play_deviates_by_near_misses_or_admissible_actions(serve) -> None:  # noqa: ANN001
    url = serve(create_env_app(EnvSettings()))
    slips = [s for t in _play(url, noise=1.0, near_miss=1.0) for s in t.steps]
    randoms = [s for t in _play(url, noise=1.0, near_miss=0.0) for s in t.steps]
    # Every step a near miss: the expert's action with one number changed...
    assert all(s.action != s.expert_action for s in slips)
    assert all(re.sub(r"\d+", "#", s.action) == re.sub(r"\d+", "#", s.expert_action) for s in slips)
    # ...that mostly does not apply, and the judge's label for that is Strong.
    failed = [s for s in slips if s.feedback == NOTHING_HAPPENS]
    assert len(failed) >= len(slips) // 2 and all(s.label == "Strong" for s in failed)
    # Without near misses every deviation is one of the admissible actions.
    assert all(s.action in s.admissible_actions for s in randoms)
