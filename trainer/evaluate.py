"""Evaluation: play every task of a split greedily through the env service and measure it;
or, faster and finer, score a model's greedy answers on the expert's own episodes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from client.env import EnvClient
from client.prompts import ChatRenderer, History
from trainer.models import AgentSpec
from trainer.rollout import BatchedGenerator, EpisodeRecord, run_episodes

if TYPE_CHECKING:
    from trainer.data import Trajectory


@dataclass(frozen=True)
class EvalResult:
    split: str
    episodes: int
    success: float
    avg_turns: float
    invalid_rate: float  # turns whose response named no admissible action
    repeated_rate: float  # turns repeating the previous action with the same feedback

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"{self.split}: success {self.success:.1%} over {self.episodes} tasks, "
            f"avg turns {self.avg_turns:.1f}, invalid actions {self.invalid_rate:.1%}, "
            f"repeated actions {self.repeated_rate:.1%}"
        )


def summarize(split: str, episodes: list[EpisodeRecord]) -> EvalResult:
    turns = [turn for episode in episodes for turn in episode.turns]
    n_turns = max(1, len(turns))
    return EvalResult(
        split=split,
        episodes=len(episodes),
        success=sum(e.won for e in episodes) / max(1, len(episodes)),
        avg_turns=len(turns) / max(1, len(episodes)),
        invalid_rate=sum(not t.admissible for t in turns) / n_turns,
        repeated_rate=sum(t.repeated for t in turns) / n_turns,
    )


@dataclass(frozen=True)
class ForcedResult:
    """How often a model's greedy response is the expert's, in the expert's own contexts.

    Each turn of an expert episode is shown as the expert lived it (its earlier actions
    in the history); a turn counts when every token the model would generate greedily
    there, end-of-turn included, is the expert's. One forward pass per episode instead
    of a rollout, and it separates the kinds of action a model has not learned.
    """

    split: str
    turns: int
    exact: float  # share of turns answered exactly as the expert did
    episodes_exact: float  # share of episodes with every turn exact
    by_verb: dict[str, float]  # the same share per action kind ("go", "take", ...)

    def line(self) -> str:
        verbs = ", ".join(f"{verb} {share:.1%}" for verb, share in self.by_verb.items())
        return (
            f"{self.split}, teacher-forced on the expert's episodes: {self.exact:.1%} of "
            f"{self.turns} turns exact, {self.episodes_exact:.1%} of episodes ({verbs})"
        )


def teacher_forced(
    model: Any,
    renderer: ChatRenderer,
    trajectories: Sequence[Trajectory],
    history: History,
    batch_size: int = 16,
) -> ForcedResult:
    """Score ``model`` on expert ``trajectories`` (see ForcedResult)."""
    from trainer.data import executed_turns
    from trainer.sft import Example, batch_logits, collate

    contexts = []  # (episode index, input ids, spans, expert action of each span)
    for e, trajectory in enumerate(trajectories):
        actions = [step.expert_action or step.action for step in trajectory.steps]
        turns = executed_turns(renderer, trajectory)
        for rendered in renderer.contexts(trajectory.task, turns, history):
            named = [actions[t] for t in rendered.turns]  # one turn per trained span
            contexts.append((e, rendered.input_ids, rendered.spans, named))
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    episode_ok = [True] * len(trajectories)
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(contexts), batch_size):
            chunk = contexts[start : start + batch_size]
            batch = collate(
                [Example(ids, []) for _, ids, _, _ in chunk], renderer.tokenizer.pad_token_id
            )
            logits_BLV = batch_logits(model, {k: v.to(device) for k, v in batch.items()})
            greedy_BL = logits_BLV.argmax(-1).cpu()
            for b, (e, ids, spans, named) in enumerate(chunk):
                for (first, end), action in zip(spans, named, strict=True):
                    # The logits at position p - 1 choose the token at p.
                    exact = greedy_BL[b, first - 1 : end - 1].tolist() == ids[first:end]
                    verb = action.split(" ", 1)[0]
                    totals[verb] += 1
                    hits[verb] += exact
                    episode_ok[e] &= exact
    count = sum(totals.values())
    return ForcedResult(
        split=trajectories[0].split if trajectories else "",
        turns=count,
        exact=sum(hits.values()) / max(1, count),
        episodes_exact=sum(episode_ok) / max(1, len(trajectories)),
        by_verb={verb: hits[verb] / totals[verb] for verb, _ in totals.most_common()},
    )


async def task_count(env: EnvClient, env_name: str, split: str, limit: int | None) -> int:
    """How many tasks of ``split`` an evaluation plays: all, or the first ``limit``."""
    size = await env.split_size(env_name, split)
    return size if limit is None else min(limit, size)


async def play_greedy(
    model: Any,
    tokenizer: Any,
    env_url: str,
    split: str,
    agent: AgentSpec,
    limit: int | None = None,
    progress: bool = True,
) -> list[EpisodeRecord]:
    """``model``'s greedy episodes on ``split`` (all tasks, or the first ``limit``), its
    prompts rendered as ``agent`` says."""
    async with EnvClient(env_url, max_connections=64) as env:
        count = await task_count(env, agent.env, split, limit)
        async with BatchedGenerator(model, tokenizer, temperature=0.0) as generator:
            return await run_episodes(
                env,
                generator,
                agent.renderer(tokenizer),
                split,  # type: ignore[arg-type]
                list(range(count)),
                agent,
                concurrency=64,
                progress=progress,
            )
