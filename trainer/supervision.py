"""Supervision: each finished episode goes to a teacher's fused call (every response
token scored, every turn judged); the forced-Strong rules of METHOD.md are applied to
the verdicts here. Teachers are used round-robin, and each model a teacher answers
with is checked once for the student's vocabulary.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

from client.fingerprint import TokenizerFingerprint, VocabularyMismatch, check_same_vocabulary
from client.http import ServiceCallError
from client.protocol import EpisodeResponse, EpisodeTurn, Label, ModelRef
from client.teacher import TeacherClient
from trainer.config import LossConfig, TrainConfig
from trainer.losses import FULL_DIVERGENCES, LossSwitches
from trainer.rollout import EpisodeRecord, TurnRecord


class TeacherVocabularyChanged(RuntimeError):
    """The teacher service now serves a model whose vocabulary is not the student's."""


@dataclass
class SupervisedEpisode:
    record: EpisodeRecord
    labels: list[Label]  # after the forced-Strong rules
    forced: list[bool]  # the label was forced, not the judge's
    teacher_logprobs: list[list[float]]  # per turn, per response token
    teacher_top1: list[list[float]]
    topk_ids: list[list[list[int]]] | None
    topk_logprobs: list[list[list[float]]] | None
    model: ModelRef
    tokens_forwarded: int


def forced_label(turn: TurnRecord, repeated_is_strong: bool) -> bool:
    """METHOD.md: these turns are Strong without asking the judge."""
    if turn.failed:
        return True
    return repeated_is_strong and turn.repeated


def switches_of(loss: LossConfig) -> LossSwitches:
    """The loss of a config: OPD (every SAGE part off), SAGE-OPD, or imitation (sft)."""
    if loss.kind == "sft":  # every imitated token weighs 1 / N_tok
        return LossSwitches.opd(divergence="nll")
    common = {"ppo_clip": loss.ppo_clip, "divergence": loss.divergence, "jsd_beta": loss.jsd_beta}
    if loss.kind == "opd":
        return LossSwitches.opd(**common)
    return LossSwitches(
        intervention=loss.intervention,
        confidence=loss.confidence,
        normalization=loss.normalization,
        alpha=loss.alpha,
        **common,
    )


def wants_top_k(loss: LossConfig) -> int:
    """How many teacher log-probs per token the loss reads (0: only the sampled token's)."""
    return loss.top_k if loss.kind != "sft" and loss.divergence in FULL_DIVERGENCES else 0


class Supervisor:
    """Sends finished episodes to the teachers (round-robin) and reads their answers."""

    def __init__(
        self,
        teachers: list[TeacherClient],
        config: TrainConfig,
        student_fingerprint: TokenizerFingerprint,
    ) -> None:
        self.teachers = teachers
        self.diagnosing = teachers[0] if teachers else None  # scores the eval decisions
        self._next = itertools.cycle(range(len(teachers)))
        self.config = config
        self.student_fingerprint = student_fingerprint
        self.checked: set[tuple[int, str, str]] = set()  # (teacher, model, revision) known good
        # The judge is asked only when its verdicts are used (OPD never reads them).
        self.judge = config.loss.kind == "sage" and config.loss.intervention

    async def check(self, index: int) -> None:
        """Check the vocabulary of teacher ``index``'s active model (once per model revision)."""
        active = await self.teachers[index].active_model()
        key = (index, active.name, active.revision)
        if key in self.checked:
            return
        assert active.fingerprint is not None
        try:
            check_same_vocabulary(self.student_fingerprint, active.fingerprint)
        except VocabularyMismatch as exc:
            raise TeacherVocabularyChanged(
                f"teacher {self.teachers[index].base_url} serves {active.name} "
                f"(revision {active.revision}): {exc}"
            ) from exc
        self.checked.add(key)

    def wire_turns(self, record: EpisodeRecord) -> list[EpisodeTurn]:
        """The turns as the student saw them (no admissible list if it was not shown one)."""
        turns = record.episode_turns()
        if not self.config.show_admissible:
            turns = [turn.model_copy(update={"admissible_actions": []}) for turn in turns]
        return turns

    async def supervise(self, record: EpisodeRecord) -> SupervisedEpisode:
        index = next(self._next)
        try:
            answer: EpisodeResponse = await self.teachers[index].score_episode(
                record.task,
                self.wire_turns(record),
                judge=self.judge,
                top_k=wants_top_k(self.config.loss),
                history=self.config.history,
            )
        except ServiceCallError:
            await self.check(index)  # a model with another vocabulary refuses our ids
            raise
        if (index, answer.model.name, answer.model.revision) not in self.checked:
            await self.check(index)  # a model not seen before answered: same vocabulary?
        labels, forced = [], []
        for turn, scored in zip(record.turns, answer.turns, strict=True):
            if len(scored.scores.logprobs) != len(turn.response_ids):
                raise ValueError("the teacher scored another number of tokens than were sent")
            force = forced_label(turn, self.config.loss.force_strong_repeated)
            force = force or (self.judge and scored.verdict is None)
            verdict = scored.verdict.label if scored.verdict is not None else "Strong"
            labels.append("Strong" if force else verdict)
            forced.append(force)
        top_k = wants_top_k(self.config.loss) > 0
        return SupervisedEpisode(
            record=record,
            labels=labels,
            forced=forced,
            teacher_logprobs=[t.scores.logprobs for t in answer.turns],
            teacher_top1=[t.scores.top1_probs for t in answer.turns],
            topk_ids=[t.scores.topk_ids or [] for t in answer.turns] if top_k else None,
            topk_logprobs=[t.scores.topk_logprobs or [] for t in answer.turns] if top_k else None,
            model=answer.model,
            tokens_forwarded=answer.tokens_forwarded,
        )


def label_metrics(episodes: list[SupervisedEpisode]) -> dict[str, float]:
    labels = Counter(label for e in episodes for label in e.labels)
    n = max(1, sum(labels.values()))
    forced = sum(f for e in episodes for f in e.forced)
    top1 = [p for e in episodes for turn in e.teacher_top1 for p in turn]
    return {
        "label_skip": labels["Skip"] / n,
        "label_weak": labels["Weak"] / n,
        "label_strong": labels["Strong"] / n,
        "forced_strong": forced / n,
        "teacher_confidence": sum(top1) / max(1, len(top1)),
        "teacher_tokens": float(sum(e.tokens_forwarded for e in episodes)),
    }
