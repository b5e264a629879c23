"""The teacher's OpenAI-compatible route: /v1/completions for scoring clients (echo and
logprobs, vLLM's prompt_logprobs, greedy continuations, a choice among allowed token ids),
and the helpers that shape its answer."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from fastapi import APIRouter

from client.protocol import (
    API_PREFIX,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    SpanScores,
)
from services.http import ServiceError
from services.teacher.backends.base import JudgeItem, ScoreItem
from services.teacher.deps import ClientId, Model, Service
from services.teacher.limits import check_ids, check_size, check_text
from services.teacher.registry import LoadedModel
from services.teacher.routes import ERRORS
from services.teacher.service import TeacherService

router = APIRouter(prefix=API_PREFIX, responses=ERRORS)


def _prompts(body: CompletionRequest, model: LoadedModel, limit: int) -> list[list[int]]:
    """The prompts as token ids, checked before any work: text encodable as UTF-8, each
    prompt non-empty, ids (and allowed_token_ids) in the vocabulary, and the prompts
    with their new tokens within ``limit``."""
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(x, int) for x in prompt):
        prompt = [prompt]
    check_text(p for p in prompt if isinstance(p, str))
    prompts = [model.backend.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ServiceError(422, "invalid_request", "Each prompt needs at least one token.")
    new_tokens = 1 if body.allowed_token_ids is not None else body.max_tokens
    check_size(sum(len(p) + new_tokens for p in prompts), limit)
    check_ids(model, prompts)
    if body.allowed_token_ids is not None:
        check_ids(model, [body.allowed_token_ids], "allowed_token_ids")
    return prompts


@router.post("/completions", response_model=CompletionResponse, response_model_exclude_none=True)
async def completions(
    body: CompletionRequest, service: Service, model: Model, client: ClientId
) -> CompletionResponse:
    """OpenAI's completions for scoring clients: echo + logprobs, and vLLM's prompt_logprobs.

    Continuations (max_tokens > 0) are greedy. With ``allowed_token_ids`` (one new
    token), the token is chosen among those ids and its top log-probs are theirs,
    renormalised over them: how a judge's verdict is read through this route.
    """
    if body.model not in (None, model.name):
        raise ServiceError(404, "model_not_found", f"This teacher serves {model.name!r}.")
    prompts = _prompts(body, model, service.settings.max_request_tokens)
    if body.allowed_token_ids is not None and body.max_tokens != 1:
        raise ServiceError(422, "invalid_request", "allowed_token_ids needs max_tokens == 1.")
    k = max(body.logprobs or 0, body.prompt_logprobs or 0)
    wants_prompt = body.echo and body.logprobs is not None or body.prompt_logprobs is not None
    scores: list[list[SpanScores]] = [[] for _ in prompts]
    scorable = [i for i, p in enumerate(prompts) if wants_prompt and len(p) > 1]
    if scorable:
        items = [ScoreItem(prompts[i], [(1, len(prompts[i]))]) for i in scorable]
        results = await service.run(
            model,
            "score",
            items,
            lambda chunk: model.backend.score(chunk, k),
            (k,),
            client,
            None,
        )
        for i, spans in zip(scorable, results, strict=True):
            scores[i] = spans
    tokenizer = model.backend.tokenizer
    choices = []
    completion_tokens = 0
    for index, ids in enumerate(prompts):
        new_ids: list[int] = []
        new_logprobs: list[float] = []
        new_top: list[dict[str, float]] = []
        if body.allowed_token_ids is not None:
            new_ids, new_logprobs, new_top = await _choose(
                service, model, ids, body.allowed_token_ids, client
            )
        elif body.max_tokens > 0:
            new_ids, new_logprobs = await _continue(service, model, ids, body.max_tokens, client)
        completion_tokens += len(new_ids)
        span = scores[index][0] if scores[index] else None
        choices.append(
            CompletionChoice(
                index=index,
                text=tokenizer.decode(new_ids),
                logprobs=_openai_logprobs(
                    tokenizer, ids, span, new_ids, new_logprobs, new_top, body
                )
                if body.logprobs is not None
                else None,
                finish_reason="length",
                prompt_logprobs=_vllm_prompt_logprobs(tokenizer, ids, span)
                if body.prompt_logprobs is not None
                else None,
                prompt_token_ids=ids if body.prompt_logprobs is not None else None,
            )
        )
    prompt_tokens = sum(len(p) for p in prompts)
    service.metrics.requests.labels(model.name, "completions").inc()
    return CompletionResponse(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model.name,
        choices=choices,
        usage=CompletionUsage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )


async def _continue(
    service: TeacherService, model: LoadedModel, ids: list[int], max_tokens: int, client: str
) -> tuple[list[int], list[float]]:
    [result] = await service.run(
        model,
        "generate",
        [JudgeItem(ids)],
        lambda chunk: [model.backend.continue_greedy(item.input_ids, max_tokens) for item in chunk],
        (max_tokens,),
        client,
        None,
    )
    return result


async def _choose(
    service: TeacherService, model: LoadedModel, ids: list[int], allowed: list[int], client: str
) -> tuple[list[int], list[float], list[dict[str, float]]]:
    """One token among ``allowed``: the likeliest, with log-probs renormalised over them."""
    [probs] = await service.run(
        model,
        "judge",
        [JudgeItem(ids)],
        lambda chunk: model.backend.label_probs(chunk, allowed),
        (),
        client,
        None,
    )
    logprobs = [math.log(p) if p > 0 else -math.inf for p in probs]
    best = max(range(len(allowed)), key=logprobs.__getitem__)
    tokenizer = model.backend.tokenizer
    top = {_piece(tokenizer, t): v for t, v in zip(allowed, logprobs, strict=True)}
    return [allowed[best]], [logprobs[best]], [top]


def _piece(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _openai_logprobs(
    tokenizer: Any,
    prompt: list[int],
    span: SpanScores | None,
    new_ids: list[int],
    new_logprobs: list[float],
    new_top: list[dict[str, float]],
    body: CompletionRequest,
) -> CompletionLogprobs:
    ids = (prompt if body.echo else []) + new_ids
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    if body.echo:
        token_logprobs.append(None)
        top.append(None)
        for j in range(len(prompt) - 1):
            token_logprobs.append(span.logprobs[j] if span else None)
            if span and span.topk_ids:
                top.append(
                    {
                        _piece(tokenizer, t): v
                        for t, v in zip(span.topk_ids[j], span.topk_logprobs[j], strict=True)
                    }
                )
            else:
                top.append(None)
    token_logprobs.extend(new_logprobs)
    top.extend(new_top or [None] * len(new_logprobs))
    tokens = [_piece(tokenizer, t) for t in ids]
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top, text_offset=offsets
    )


def _vllm_prompt_logprobs(
    tokenizer: Any, prompt: list[int], span: SpanScores | None
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's shape: None first, then {token id: {logprob, rank, decoded_token}} per position."""
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for j, token in enumerate(prompt[1:]):
        entries: dict[str, dict[str, Any]] = {}
        ids = span.topk_ids[j] if span and span.topk_ids else []
        values = span.topk_logprobs[j] if span and span.topk_logprobs else []
        for rank, (t, v) in enumerate(zip(ids, values, strict=True), start=1):
            entries[str(t)] = {"logprob": v, "rank": rank, "decoded_token": _piece(tokenizer, t)}
        if str(token) not in entries and span:
            entries[str(token)] = {
                "logprob": span.logprobs[j],
                "rank": None,
                "decoded_token": _piece(tokenizer, token),
            }
        out.append(entries)
    return out
