"""Why a run moves: the student's search decisions, and what the teacher says of them.

An agent trained with search thoughts starts a response that searches with
"Thought: apple 1 here" when the object it seeks is in view and "Thought: apple
not here" when it is not (trainer/data.py add_search_thoughts; in the decision
style "Thought: apple here"). The token after "Thought: apple" is the decision.
In the student's own episodes, every such turn is one decision of one of two
kinds: the object its thought names is in view (the contents last seen list
"apple N"), or it is not. For each kind we measure how often the student says
"not here", and, where a teacher is at hand, the teacher's mean log-prob at the
decision token of the right answer (the number in view, or " here"), of a wrong
number (number style only), and of " not": what the per-token loss trades
against each other.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from client.household import DECISION, NOTHING_HAPPENS, ThoughtStyle
from client.prompts import ChatRenderer
from client.protocol import EpisodeTurn
from client.teacher import TeacherClient
from trainer.data import views_in
from trainer.models import AgentSpec
from trainer.rollout import EpisodeRecord

KINDS = ("in_view", "not_in_view")


@dataclass(frozen=True)
class Decision:
    """One search decision in an episode: turn ``turn`` of ``episode``."""

    episode: int
    turn: int
    sought: str
    numbers_in_view: tuple[int, ...]  # the sought object's numbers in view (none: not in view)
    said_not: bool
    prefix_len: int  # response tokens up to and including the sought object's name

    @property
    def kind(self) -> str:
        return "in_view" if self.numbers_in_view else "not_in_view"


def decisions_in(episodes: Sequence[EpisodeRecord], tokenizer: Any) -> list[Decision]:
    """Every turn whose response starts with a search thought, in episode order."""
    out = []
    for e, episode in enumerate(episodes):
        views = views_in([turn.observation for turn in episode.turns])
        for t, (turn, view) in enumerate(zip(episode.turns, views, strict=True)):
            text = tokenizer.decode(turn.response_ids, skip_special_tokens=True)
            match = DECISION.match(text.split("\n", 1)[0])
            if match is None:
                continue
            sought = match["sought"]
            head = f"Thought: {sought}"
            prefix_len = next(
                (
                    k
                    for k in range(1, len(turn.response_ids))
                    if tokenizer.decode(turn.response_ids[:k], skip_special_tokens=True) == head
                ),
                None,
            )
            if prefix_len is None:  # the name ends inside a token: no clean decision token
                continue
            numbers = re.findall(rf"\b{re.escape(sought)} (\d+)", view or "")
            out.append(
                Decision(
                    e,
                    t,
                    sought,
                    tuple(sorted({int(n) for n in numbers})),
                    text.startswith(f"{head} not here"),
                    prefix_len,
                )
            )
    return out


@dataclass
class DecisionStats:
    """Per kind: decisions, the share answered "not here", the teacher's mean log-probs."""

    count: dict[str, int] = field(default_factory=dict)
    says_not: dict[str, float] = field(default_factory=dict)
    teacher: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> answer -> lp
    # In view: the share of decisions where the teacher prefers " not" to the right answer.
    teacher_says_not: float | None = None

    def as_metrics(self, prefix: str) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.teacher_says_not is not None:
            out[f"{prefix}_in_view_teacher_says_not"] = self.teacher_says_not
        for kind in KINDS:
            out[f"{prefix}_{kind}_decisions"] = float(self.count.get(kind, 0))
            if kind in self.says_not:
                out[f"{prefix}_{kind}_says_not"] = self.says_not[kind]
            for answer, value in self.teacher.get(kind, {}).items():
                out[f"{prefix}_{kind}_teacher_lp_{answer}"] = value
        return out


def single_token(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def candidates(decision: Decision, tokenizer: Any, style: ThoughtStyle) -> dict[str, int]:
    """The decision token's answers to score: not; right where the object is in view (its
    number, or " here"); a wrong number (number style)."""
    texts = {"not": " not"}
    if decision.numbers_in_view:
        texts["right"] = f" {decision.numbers_in_view[0]}" if style == "number" else " here"
    if style == "number":
        wrong = next(n for n in range(1, 100) if n not in decision.numbers_in_view)
        texts["wrong"] = f" {wrong}"
    tokens = {answer: single_token(tokenizer, text) for answer, text in texts.items()}
    return {answer: token for answer, token in tokens.items() if token is not None}


async def teacher_logprobs(
    teacher: TeacherClient,
    episode: EpisodeRecord,
    decision: Decision,
    tokens: dict[str, int],
    history: int | None,
) -> dict[str, float]:
    """The teacher's log-prob of each candidate token at the decision, in the student's context.

    The turn's response is cut after the sought object's name and one candidate is
    appended; the teacher renders the conversation with its own template (the fused
    episode call, no judging) and its log-prob of the last token is the answer."""
    turns = episode.episode_turns()[: decision.turn + 1]
    head = turns[-1].response_ids[: decision.prefix_len]
    out = {}
    for answer, token in tokens.items():
        cut: list[EpisodeTurn] = [
            *turns[:-1],
            turns[-1].model_copy(update={"response_ids": [*head, token], "feedback": ""}),
        ]
        scored = await teacher.score_episode(episode.task, cut, judge=False, history=history)
        out[answer] = scored.turns[-1].scores.logprobs[-1]
    return out


async def decision_stats(
    episodes: Sequence[EpisodeRecord],
    renderer: ChatRenderer,
    teacher: TeacherClient | None,
    agent: AgentSpec,
    limit: int = 64,
    concurrency: int = 8,
) -> DecisionStats:
    """The student's search decisions in ``episodes``; with ``teacher``, its log-probs at
    the first ``limit`` decisions of each kind."""
    tokenizer = renderer.tokenizer
    decisions = decisions_in(episodes, tokenizer)
    stats = DecisionStats()
    for kind in KINDS:
        mine = [d for d in decisions if d.kind == kind]
        stats.count[kind] = len(mine)
        if mine:
            stats.says_not[kind] = sum(d.said_not for d in mine) / len(mine)
    if teacher is None:
        return stats
    limit_calls = asyncio.Semaphore(concurrency)

    async def one(decision: Decision) -> tuple[str, dict[str, float]]:
        async with limit_calls:
            tokens = candidates(decision, tokenizer, agent.thought_style)
            scored = await teacher_logprobs(
                teacher, episodes[decision.episode], decision, tokens, agent.history
            )
        return decision.kind, scored

    chosen = [d for kind in KINDS for d in [d for d in decisions if d.kind == kind][:limit]]
    answers = await asyncio.gather(*(one(d) for d in chosen))
    for kind in KINDS:
        values: dict[str, list[float]] = {}
        for answer_kind, scored in answers:
            if answer_kind == kind:
                for answer, value in scored.items():
                    values.setdefault(answer, []).append(value)
        stats.teacher[kind] = {answer: sum(v) / len(v) for answer, v in values.items()}
    # Where the object is in view, how often the teacher itself would rather say "not".
    pairs = [s for kind, s in answers if kind == "in_view" and {"right", "not"} <= set(s)]
    if pairs:
        stats.teacher_says_not = sum(s["not"] > s["right"] for s in pairs) / len(pairs)
    return stats


@dataclass(frozen=True)
class Agreement:
    """How often a model's greedy action is the expert's, in another agent's states."""

    model: str
    fresh: tuple[int, int]  # (agreeing, states) where the last action did not fail
    after_failure: tuple[int, int]  # the same right after "Nothing happens."

    def line(self) -> str:
        def share(part: tuple[int, int]) -> str:
            return f"{part[0] / max(1, part[1]):.1%} of {part[1]}"

        return (
            f"{self.model}: the expert's action in {share(self.fresh)} fresh states, "
            f"{share(self.after_failure)} states after a failed action"
        )


async def expert_agreement(
    player: Any,
    models: dict[str, Any],
    renderer: ChatRenderer,
    env_url: str,
    split: str,
    task_ids: list[int],
    agent: AgentSpec,
) -> list[Agreement]:
    """Play ``task_ids`` greedily with ``player`` (the student), the expert naming its
    action in every state reached; then ask each of ``models`` (e.g. the teacher) for
    its greedy action in those same states, rendered as the player lived them. A
    teacher is a good supervisor for OPD only where it agrees with the expert in the
    student's own states, most of all after the student's failures."""
    from client.env import EnvClient
    from client.prompts import parse_action
    from trainer.data import ModelPolicy, executed_turns, gather
    from trainer.rollout import BatchedGenerator

    tokenizer = renderer.tokenizer
    async with (
        EnvClient(env_url, max_connections=64) as env,
        BatchedGenerator(player, tokenizer, temperature=0.0) as generator,
    ):
        played = await gather(
            env,
            task_ids,
            1.0,  # the player acts in every state
            0,
            split,
            agent,
            concurrency=64,
            progress=False,
            policy=ModelPolicy(generator, renderer, agent.history),
        )
    states = []  # (prompt, the expert's action, right after a failure)
    for trajectory in played:
        turns = executed_turns(renderer, trajectory, own_words=True)
        for t, step in enumerate(trajectory.steps):
            if step.expert_action is None:
                continue
            failed = t > 0 and step.observation == NOTHING_HAPPENS
            prompt = renderer.prompt(
                trajectory.task, turns[:t], step.observation, step.admissible_actions, agent.history
            )
            states.append((prompt, step.expert_action, failed))
    out = []
    for name, model in models.items():
        greedy = BatchedGenerator(model, tokenizer, temperature=0.0)
        hits = {False: [0, 0], True: [0, 0]}
        for start in range(0, len(states), 32):
            chunk = states[start : start + 32]
            samples, _ = greedy.generate_now([prompt for prompt, _, _ in chunk])
            for (_, expert, failed), sample in zip(chunk, samples, strict=True):
                text = tokenizer.decode(sample.token_ids, skip_special_tokens=True)
                hits[failed][0] += parse_action(text) == expert
                hits[failed][1] += 1
        out.append(Agreement(name, tuple(hits[False]), tuple(hits[True])))  # type: ignore[arg-type]
    return out
