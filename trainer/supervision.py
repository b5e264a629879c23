"""Supervision: each finished episode goes to a teacher's fused call (every response
token scored, every turn judged); the forced-Strong rules of METHOD.md are applied to
the verdicts here.

Teachers come in groups (TrainConfig.teachers: an environment or task-type pattern
to its teachers' URLs; teacher_urls when there is none), used round-robin within a
group. Each model a teacher answers with is looked up once: with the student's
vocabulary it scores the student's token ids (token-level), with another it scores
its own tokens of the response text (chunk-level, trainer/alignment.py). A swap to a
model of another family is seen at its first answer, and the episode is sent again
in the new model's alignment: the run goes on.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from client.fingerprint import VocabularyMismatch, check_same_vocabulary, fingerprint_of
from client.http import ServiceCallError
from client.protocol import EpisodeResponse, EpisodeTurn, Label, ModelInfo, ModelRef
from client.teacher import TeacherClient
from trainer.alignment import Alignment
from trainer.config import LossConfig, TrainConfig
from trainer.losses import FULL_DIVERGENCES, LossSwitches
from trainer.rollout import EpisodeRecord, TurnRecord

log = logging.getLogger(__name__)


class CrossTokenizerDivergence(ValueError):
    """A full-distribution divergence with a teacher of another vocabulary: its top-k
    ids name tokens the student does not have."""


@dataclass
class SupervisedEpisode:
    record: EpisodeRecord
    labels: list[Label]  # after the forced-Strong rules
    forced: list[bool]  # the label was forced, not the judge's
    teacher_logprobs: list[list[float]]  # per turn, per teacher token (the student's, token-level)
    teacher_top1: list[list[float]]
    topk_ids: list[list[list[int]]] | None
    topk_logprobs: list[list[list[float]]] | None
    model: ModelRef
    tokens_forwarded: int
    # Chunk-level: per turn, where each teacher token ends in the response text (None:
    # token-level, the teacher scored the student's own tokens).
    teacher_offsets: list[list[int]] | None = None
    teacher: str = ""  # the URL of the teacher that supervised it


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


@dataclass
class TeacherGroup:
    """The teachers of the episodes whose environment (or env/task type) ``pattern`` matches."""

    pattern: str
    turn: Iterator[int]  # round robin over its indices into Supervisor.teachers

    def matches(self, record: EpisodeRecord) -> bool:
        return fnmatch.fnmatchcase(record.env, self.pattern) or fnmatch.fnmatchcase(
            f"{record.env}/{record.task_type}", self.pattern
        )


class Supervisor:
    """Sends finished episodes to their group's teachers (round-robin) and reads the answers."""

    def __init__(
        self,
        teachers: list[TeacherClient],
        config: TrainConfig,
        student_tokenizer: Any,
        groups: dict[str, list[int]] | None = None,
    ) -> None:
        """``groups``: pattern -> indices of ``teachers`` (None: one group of them all)."""
        self.teachers = teachers
        self.groups = [
            TeacherGroup(pattern, itertools.cycle(members))
            for pattern, members in (groups or {"*": list(range(len(teachers)))}).items()
        ]
        self.config = config
        self.tokenizer = student_tokenizer
        self.student_fingerprint = fingerprint_of(student_tokenizer)
        # (teacher, model, revision) -> how that model supervises
        self.alignments: dict[tuple[int, str, str], Alignment] = {}
        self.current: dict[int, Alignment] = {}  # per teacher, its last model's
        # The judge is asked only when its verdicts are used (OPD never reads them).
        self.judge = config.loss.kind == "sage" and config.loss.intervention

    @property
    def diagnosing(self) -> TeacherClient | None:
        """The teacher that scores the evaluation's decisions (trainer/diagnostics.py),
        which are student token ids: the first that supervises token-level, if any."""
        for index, teacher in enumerate(self.teachers):
            if self.current.get(index) == "tokens":
                return teacher
        return None

    def teacher_for(self, record: EpisodeRecord) -> int:
        """The next teacher of the first group whose pattern matches the episode."""
        for group in self.groups:
            if group.matches(record):
                return next(group.turn)
        raise LookupError(
            f"no teacher group matches environment {record.env!r}, task type "
            f"{record.task_type!r}; the patterns are {[g.pattern for g in self.groups]} "
            "(add '*' for every other episode)"
        )

    async def check(self, index: int, ref: ModelRef | None = None) -> Alignment:
        """How teacher ``index``'s model ``ref`` (None: its active one) supervises,
        decided once per model revision from the two vocabularies and logged; it is
        what the teacher's next episode is sent as."""
        key = (index, ref.name, ref.revision) if ref is not None else None
        if key not in self.alignments:  # a model not seen yet, or which one is active?
            info = _find(await self.teachers[index].models(), ref)
            key = (index, info.name, info.revision)
        if key in self.alignments:
            self.current[index] = self.alignments[key]
            return self.alignments[key]
        assert info.fingerprint is not None
        alignment: Alignment = "tokens"
        try:
            check_same_vocabulary(self.student_fingerprint, info.fingerprint)
        except VocabularyMismatch:
            alignment = "chunks"
        if self.config.alignment == "chunks":
            alignment = "chunks"
        if alignment == "chunks" and self.config.loss.divergence in FULL_DIVERGENCES:
            raise CrossTokenizerDivergence(
                f"loss.divergence {self.config.loss.divergence} compares whole distributions "
                f"over one vocabulary, but teacher {self.teachers[index].base_url} "
                f"({info.name}, revision {info.revision}) is supervised chunk-level "
                f"(vocab {info.fingerprint.vocab_hash}, {info.fingerprint.vocab_size} tokens; "
                f"the student's {self.student_fingerprint.vocab_hash}, "
                f"{self.student_fingerprint.vocab_size} tokens): use loss.divergence sampled"
            )
        previous = self.current.get(index)
        log.log(
            logging.WARNING if previous not in (None, alignment) else logging.INFO,
            "teacher %s serves %s (revision %s): %s-level supervision; student vocab %s "
            "(%d tokens), teacher vocab %s (%d tokens)",
            self.teachers[index].base_url,
            info.name,
            info.revision,
            "token" if alignment == "tokens" else "chunk",
            self.student_fingerprint.vocab_hash,
            self.student_fingerprint.vocab_size,
            info.fingerprint.vocab_hash,
            info.fingerprint.vocab_size,
        )
        self.alignments[key] = self.current[index] = alignment
        return alignment

    def wire_turns(
        self, record: EpisodeRecord, alignment: Alignment = "tokens"
    ) -> list[EpisodeTurn]:
        """The turns as the student saw them (no admissible list if it was not shown one),
        its responses as token ids (token-level) or as their text (chunk-level)."""
        turns = record.episode_turns()
        if alignment == "chunks":
            turns = [
                turn.model_copy(update=self.text_of(lived.response_ids))
                for turn, lived in zip(turns, record.turns, strict=True)
            ]
        if not self.config.show_admissible:
            turns = [turn.model_copy(update={"admissible_actions": []}) for turn in turns]
        return turns

    def text_of(self, response_ids: list[int]) -> dict[str, Any]:
        """A response's fields as text: what it says, and whether it ended its turn."""
        text = self.tokenizer.decode(response_ids, skip_special_tokens=True)
        closed = response_ids[-1] == self.tokenizer.eos_token_id or not text
        return {"response_ids": None, "response_text": text, "ends_turn": closed}

    async def ask(self, index: int, record: EpisodeRecord, alignment: Alignment) -> EpisodeResponse:
        return await self.teachers[index].score_episode(
            record.task,
            self.wire_turns(record, alignment),
            judge=self.judge,
            top_k=wants_top_k(self.config.loss) if alignment == "tokens" else 0,
            history=self.config.history,
        )

    async def supervise(self, record: EpisodeRecord) -> SupervisedEpisode:
        index = self.teacher_for(record)
        alignment = self.current.get(index) or await self.check(index)
        for attempt in range(2):  # a second time after a swap to another family
            try:
                answer = await self.ask(index, record, alignment)
            except ServiceCallError:
                # A model of another vocabulary may refuse the student's ids.
                now = await self.check(index) if not attempt else alignment
                if now == alignment:
                    raise
                alignment = now
                continue
            answered = await self.check(index, answer.model)
            if answered == alignment:
                break
            alignment = answered  # a model not seen before answered, of another family
        else:
            raise RuntimeError(f"teacher {self.teachers[index].base_url} kept changing models")
        return self.read(index, record, answer, alignment)

    def read(
        self, index: int, record: EpisodeRecord, answer: EpisodeResponse, alignment: Alignment
    ) -> SupervisedEpisode:
        """The teacher's answer as a SupervisedEpisode, after the forced-Strong rules."""
        labels, forced = [], []
        for turn, scored in zip(record.turns, answer.turns, strict=True):
            if alignment == "tokens" and len(scored.scores.logprobs) != len(turn.response_ids):
                raise ValueError("the teacher scored another number of tokens than were sent")
            offsets = scored.scores.offsets
            if alignment == "chunks" and (
                offsets is None or len(offsets) != len(scored.scores.logprobs)
            ):
                raise ValueError("the teacher did not say where its tokens end in the text")
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
            teacher_offsets=(
                [t.scores.offsets or [] for t in answer.turns] if alignment == "chunks" else None
            ),
            teacher=self.teachers[index].base_url,
        )


def _find(models: list[ModelInfo], ref: ModelRef | None) -> ModelInfo:
    """The model ``ref`` names among ``models`` (None, or no longer listed: the active one)."""
    for model in models:
        if ref is not None and (model.name, model.revision) == (ref.name, ref.revision):
            return model
    for model in models:
        if model.active:
            return model
    raise LookupError("the teacher serves no model")


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
