"""Async clients of a teacher: SAGE-OPD's own teacher service, or any OpenAI-compatible server.

Both give the trainer the same calls (``score_episode``, ``fingerprint``), so a
plain ``vllm serve`` can stand in for the teacher service. Retries with backoff
come from client/http.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from client.fingerprint import VocabularyMismatch, check_same_vocabulary, fingerprint_of
from client.http import JsonClient, RetryPolicy, ServiceCallError
from client.prompts import ChatRenderer, label_word
from client.protocol import (
    API_PREFIX,
    LABELS,
    CompletionRequest,
    CompletionResponse,
    EpisodeRequest,
    EpisodeResponse,
    EpisodeSpec,
    EpisodeTurn,
    ErrorBody,
    JudgeRequest,
    JudgeResponse,
    LoadModelRequest,
    ModelInfo,
    ModelList,
    ModelRef,
    ScoredSequence,
    ScoreRequest,
    ScoreResponse,
    Span,
    SpanScores,
    SwapRequest,
    TokenizerFingerprint,
    TurnScores,
    TurnVerdict,
)

__all__ = [
    "OpenAITeacherClient",
    "RetryPolicy",
    "ServiceCallError",
    "TeacherClient",
    "VocabularyMismatch",
    "check_same_vocabulary",
    "fingerprint_of",
]


class TeacherClient(JsonClient):
    """The native teacher API. ``admin_token`` is needed only for load / swap / unload."""

    def __init__(self, base_url: str, admin_token: str | None = None, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self._admin = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}

    async def score(
        self, sequences: Sequence[tuple[list[int], list[tuple[int, int]]]], top_k: int = 0
    ) -> ScoreResponse:
        request = ScoreRequest(
            sequences=[
                ScoredSequence(input_ids=ids, spans=[Span(start=s, end=e) for s, e in spans])
                for ids, spans in sequences
            ],
            top_k=top_k,
        )
        return await self.call(
            "POST", f"{API_PREFIX}/score", ScoreResponse, request, idempotent=True
        )

    async def judge(
        self, episodes: Sequence[EpisodeSpec], history: int | None = None
    ) -> JudgeResponse:
        request = JudgeRequest(episodes=list(episodes), history=history)
        return await self.call(
            "POST", f"{API_PREFIX}/judge", JudgeResponse, request, idempotent=True
        )

    async def score_episode(
        self,
        task: str,
        turns: Sequence[EpisodeTurn],
        judge: bool = True,
        top_k: int = 0,
        history: int | None = None,
    ) -> EpisodeResponse:
        """Scores for every response token and a verdict for every turn, in one call."""
        request = EpisodeRequest(
            task=task, turns=list(turns), judge=judge, top_k=top_k, history=history
        )
        return await self.call(
            "POST", f"{API_PREFIX}/episode", EpisodeResponse, request, idempotent=True
        )

    async def models(self) -> list[ModelInfo]:
        answer = await self.call("GET", f"{API_PREFIX}/models", ModelList, idempotent=True)
        return answer.models

    async def active_model(self) -> ModelInfo:
        for model in await self.models():
            if model.active:
                return model
        raise LookupError(f"{self.base_url} serves no model")

    async def fingerprint(self) -> TokenizerFingerprint:
        model = await self.active_model()
        assert model.fingerprint is not None
        return model.fingerprint

    async def load(self, request: LoadModelRequest) -> ModelInfo:
        return await self.call(
            "POST", f"{API_PREFIX}/models/load", ModelInfo, request, headers=self._admin
        )

    async def swap(self, name: str) -> ModelInfo:
        return await self.call(
            "POST",
            f"{API_PREFIX}/models/swap",
            ModelInfo,
            SwapRequest(name=name),
            headers=self._admin,
        )

    async def unload(self, name: str) -> None:
        await self.call("DELETE", f"{API_PREFIX}/models/{name}", headers=self._admin)


class OpenAITeacherClient(JsonClient):
    """A teacher behind an OpenAI-compatible /v1/completions (vLLM's server, or ours).

    The conversation is rendered here, with ``renderer`` built on the teacher's
    tokenizer; token ids go out as the prompt. Scores come from vLLM's
    ``prompt_logprobs``; a verdict from the log-probs of the one token generated
    after the judge prompt, restricted to the label tokens (``allowed_token_ids``).
    Start a plain vLLM server with ``--logprobs-mode processed_logprobs`` so that
    those log-probs are the labels' own; otherwise a label outside the vocabulary's
    top log-probs is missing, and a verdict with no label in it counts as Strong.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        renderer: ChatRenderer,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_url, **kwargs)
        self.model = model
        self.renderer = renderer
        self.label_ids = renderer.label_ids()

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        return await self.call(
            "POST", f"{API_PREFIX}/completions", CompletionResponse, request, idempotent=True
        )

    async def score(
        self, sequences: Sequence[tuple[list[int], list[tuple[int, int]]]], top_k: int = 0
    ) -> list[list[SpanScores]]:
        out = []
        for ids, spans in sequences:
            answer = await self.complete(
                CompletionRequest(
                    model=self.model,
                    prompt=ids,
                    max_tokens=1,
                    temperature=0,
                    prompt_logprobs=max(top_k, 1),
                )
            )
            out.append(_spans_from_prompt_logprobs(ids, spans, answer, top_k))
        return out

    async def judge_prompt(self, prompt_ids: list[int]) -> TurnVerdict:
        answer = await self.complete(
            CompletionRequest(
                model=self.model,
                prompt=prompt_ids,
                max_tokens=1,
                temperature=0,
                logprobs=len(LABELS),
                allowed_token_ids=[self.label_ids[label] for label in LABELS],
            )
        )
        top = answer.choices[0].logprobs.top_logprobs[0] if answer.choices[0].logprobs else None
        logprobs = [(top or {}).get(label_word(label), -math.inf) for label in LABELS]
        if all(v == -math.inf for v in logprobs):
            # None of the labels is among the top log-probs: the verdict cannot be read.
            return TurnVerdict(label="Strong", probs={label: 0.0 for label in LABELS})
        peak = max(logprobs)
        weights = [math.exp(v - peak) for v in logprobs]
        probs = {label: w / sum(weights) for label, w in zip(LABELS, weights, strict=True)}
        return TurnVerdict(label=max(probs, key=probs.get), probs=probs)

    async def score_episode(
        self,
        task: str,
        turns: Sequence[EpisodeTurn],
        judge: bool = True,
        top_k: int = 0,
        history: int | None = None,
    ) -> EpisodeResponse:
        turns, offsets = self.renderer.own_ids(turns)  # text responses in the teacher's ids
        contexts = self.renderer.contexts(task, turns, history)
        scored = await self.score([(c.input_ids, c.spans) for c in contexts], top_k)
        out: list[TurnScores | None] = [None] * len(turns)
        tokens = 0
        for context, spans in zip(contexts, scored, strict=True):
            tokens += len(context.input_ids)
            for t, (_, end), scores in zip(context.turns, context.spans, spans, strict=True):
                verdict = None
                if judge:
                    # The prefix repeats the scored context: a prefix-caching server reads it once.
                    prompt = context.input_ids[:end] + self.renderer.judge_suffix(turns[: t + 1])
                    verdict = await self.judge_prompt(prompt)
                    tokens += len(prompt)
                if offsets[t] is not None:
                    scores = scores.model_copy(update={"offsets": offsets[t]})
                out[t] = TurnScores(scores=scores, verdict=verdict)
        return EpisodeResponse(
            model=ModelRef(name=self.model, revision="openai-compatible"),
            turns=out,
            tokens_forwarded=tokens,
        )

    async def fingerprint(self) -> TokenizerFingerprint:
        return fingerprint_of(self.renderer.tokenizer)


def _spans_from_prompt_logprobs(
    ids: list[int], spans: list[tuple[int, int]], answer: CompletionResponse, top_k: int
) -> list[SpanScores]:
    """vLLM's prompt_logprobs (None, then {id: {logprob, rank, ...}} per position) as spans."""
    positions = answer.choices[0].prompt_logprobs
    if positions is None:
        error = ErrorBody(code="no_prompt_logprobs", message="The server gave no prompt_logprobs.")
        raise ServiceCallError(502, error)
    out = []
    for start, end in spans:
        logprobs, top1, topk_ids, topk_values = [], [], [], []
        for p in range(start, end):
            entries = {int(t): e for t, e in (positions[p] or {}).items()}
            logprobs.append(float(entries[ids[p]]["logprob"]))
            ranked = sorted(entries.items(), key=lambda item: -item[1]["logprob"])
            top1.append(math.exp(ranked[0][1]["logprob"]))
            best = [t for t, _ in ranked[:top_k]]
            if ids[p] not in best:
                best.append(ids[p])
            topk_ids.append(best)
            topk_values.append([float(entries[t]["logprob"]) for t in best])
        out.append(
            SpanScores(
                logprobs=logprobs,
                top1_probs=top1,
                topk_ids=topk_ids if top_k else None,
                topk_logprobs=topk_values if top_k else None,
            )
        )
    return out
