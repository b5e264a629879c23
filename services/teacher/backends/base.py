"""What a teacher backend does, with no HTTP in sight: score token ids, read label probabilities.

A backend holds one model and its tokenizer. Everything it takes and returns is
token ids and numbers; rendering conversations (client/prompts.py) and batching
requests (services/teacher/batcher.py) happen above it. Every backend counts the
tokens it forwards, so /metrics and the benchmarks can check that an episode's
cost grows linearly with its turns.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from client.protocol import SpanScores

Spans = list[tuple[int, int]]


@dataclass(frozen=True)
class ScoreItem:
    """One sequence to score: the log-prob of each token inside each [start, end) span."""

    input_ids: list[int]
    spans: Spans

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class JudgeItem:
    """A prompt whose next token is the verdict: probabilities of ``label_ids`` after it."""

    input_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class EpisodeItem:
    """A rendered episode, and for each span the judge suffix that follows its response."""

    input_ids: list[int]
    spans: Spans
    judge_suffixes: list[list[int]] | None  # None: score only

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids) + sum(len(s) for s in self.judge_suffixes or [])


@dataclass(frozen=True)
class EpisodeScores:
    spans: list[SpanScores]
    label_probs: list[list[float]] | None  # per span, in the order of label_ids


class TeacherBackend(ABC):
    """One loaded teacher model. Calls come from one worker thread at a time."""

    kind: str  # "transformers", "vllm"
    tokenizer: Any  # a Hugging Face tokenizer
    device: str
    dtype: str
    vocab_size: int  # token ids must be below this

    def __init__(self) -> None:
        self._forwarded = 0
        self._count_lock = threading.Lock()

    @property
    def tokens_forwarded(self) -> int:
        """Tokens this backend has run through its model, over its whole life."""
        return self._forwarded

    def count_forwarded(self, tokens: int) -> None:
        with self._count_lock:
            self._forwarded += tokens

    @abstractmethod
    def score(self, items: list[ScoreItem], top_k: int) -> list[list[SpanScores]]:
        """Per item, per span: log pi_T(token | prefix), top-1 prob and optional top-k."""

    @abstractmethod
    def label_probs(self, items: list[JudgeItem], label_ids: list[int]) -> list[list[float]]:
        """Per item: next-token probabilities of ``label_ids``, renormalised over them."""

    def score_episodes(
        self, items: list[EpisodeItem], top_k: int, label_ids: list[int]
    ) -> list[EpisodeScores]:
        """Score every span and judge every turn of each episode.

        This default asks for the scores over the whole episode once and for each
        turn's verdict as its own prompt (prefix + judge suffix); backends with a
        prefix cache keep that linear in the number of turns. The transformers
        backend overrides it with a single forward per episode.
        """
        scores = self.score([ScoreItem(e.input_ids, e.spans) for e in items], top_k)
        results = []
        for episode, spans in zip(items, scores, strict=True):
            probs = None
            if episode.judge_suffixes is not None:
                prompts = [
                    JudgeItem(episode.input_ids[:end] + suffix)
                    for (_, end), suffix in zip(episode.spans, episode.judge_suffixes, strict=True)
                ]
                probs = self.label_probs(prompts, label_ids)
            results.append(EpisodeScores(spans, probs))
        return results

    @abstractmethod
    def continue_greedy(
        self, input_ids: list[int], max_new_tokens: int
    ) -> tuple[list[int], list[float]]:
        """Greedy continuation (for OpenAI-compatible completions): new ids and their log-probs."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model's memory."""
