"""Linear teacher cost: tokens forwarded to score and judge an episode, fused vs floor vs naive.

For episodes of T turns, the teacher service's fused /v1/episode call (scores
for every response token and a verdict for every turn) is made once, and the
tokens it forwarded are read from the backend's own counter (the service's
``sage_teacher_tokens_forwarded_total``). They are compared with

- the floor: the episode's tokens once, plus each turn's judge suffix once;
- the naive count: per turn, the whole prompt + response forwarded to score
  it and the whole judge prompt forwarded to judge it (the history re-read
  every turn, quadratic in T).

No timing: token counts only, with the tiny random teacher served in this
process on loopback. Prints a table per T and, last, fused / floor (target
<= 1.05) and fused / naive (target <= 0.25) at T = 20.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from _models import random_episode, scrape, series, tiny_teacher
from transformers import AutoTokenizer

from client.prompts import ChatRenderer
from client.protocol import EpisodeTurn
from client.teacher import TeacherClient
from services.http import running_server
from services.teacher.app import create_app
from services.teacher.settings import TeacherSettings

NAME = "tiny"


def floor_tokens(renderer: ChatRenderer, task: str, turns: list[EpisodeTurn]) -> int:
    """The episode once, and each turn's judge question once."""
    suffixes = sum(len(renderer.judge_suffix(turns[: t + 1])) for t in range(len(turns)))
    return len(renderer.episode(task, turns).input_ids) + suffixes


def naive_tokens(renderer: ChatRenderer, task: str, turns: list[EpisodeTurn]) -> int:
    """Per turn: its whole prompt + response to score it, its whole judge prompt to judge it."""
    total = 0
    rendered = renderer.episode(task, turns)
    for t, turn in enumerate(turns):
        prompt = renderer.prompt(task, turns[:t], turn.observation, turn.admissible_actions)
        scored = prompt + turn.response_ids
        # The scored sequence is the episode up to this response: the same tokens, re-read.
        assert scored == rendered.input_ids[: rendered.spans[t][1]]
        total += len(scored) + len(renderer.judge_prompt(task, turns[: t + 1]))
    return total


async def fused_tokens(url: str, task: str, turns: list[EpisodeTurn]) -> tuple[float, int]:
    """Tokens the backend forwarded for one fused episode call; and what the answer says."""
    before = series(scrape(url), "sage_teacher_tokens_forwarded_total", model=NAME)
    async with TeacherClient(url) as teacher:
        answer = await teacher.score_episode(task, turns, judge=True)
    after = series(scrape(url), "sage_teacher_tokens_forwarded_total", model=NAME)
    assert len(answer.turns) == len(turns) and all(t.verdict for t in answer.turns)
    return after - before, answer.tokens_forwarded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--turns", type=int, nargs="+", default=[5, 10, 20, 40], help="20 always")
    parser.add_argument("--models", type=Path, default=None, help="model cache folder")
    args = parser.parse_args()

    path = tiny_teacher(args.models, "tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    renderer = ChatRenderer(tokenizer)
    settings = TeacherSettings(model=str(path), model_name=NAME, device="cpu")
    print(f"cores: {os.cpu_count()}; teacher: tiny random Llama, vocab {len(tokenizer)}")
    print("fused: one /v1/episode call (judge=True), tokens from the backend's own counter")
    print(
        f"{'T':>4} {'fused':>8} {'floor':>8} {'naive':>9} {'fused/floor':>12} {'fused/naive':>12}"
    )
    results = {}
    with running_server(create_app(settings)) as url:
        for turns in sorted({*args.turns, 20}):  # T = 20 is the one with targets
            task, episode = random_episode(tokenizer, turns, seed=turns)
            fused, reported = asyncio.run(fused_tokens(url, task, episode))
            floor = floor_tokens(renderer, task, episode)
            naive = naive_tokens(renderer, task, episode)
            assert reported == fused, (reported, fused)
            results[turns] = (fused, floor, naive)
            print(
                f"{turns:>4} {fused:>8,.0f} {floor:>8,} {naive:>9,} "
                f"{fused / floor:>12.3f} {fused / naive:>12.3f}"
            )
    fused, floor, naive = results[20]
    print(f"linear_teacher_cost fused/floor at T=20 (target <= 1.05): {fused / floor:.3f}")
    print(f"linear_teacher_cost fused/naive at T=20 (target <= 0.25): {fused / naive:.3f}")


if __name__ == "__main__":
    main()
