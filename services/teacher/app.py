"""The teacher service's FastAPI app: score, judge, the fused episode call, models, completions.

Routes translate the wire models into backend work (token ids and spans), hand
it to the micro-batcher, and translate the numbers back. Every answer names the
model and revision that produced it.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from pydantic import ValidationError
from starlette.datastructures import Headers

from client.protocol import (
    API_PREFIX,
    CLIENT_ID_HEADER,
    LABELS,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    EpisodeRequest,
    EpisodeResponse,
    EpisodeTurn,
    ErrorBody,
    JudgeRequest,
    JudgeResponse,
    LoadModelRequest,
    ModelInfo,
    ModelList,
    ScoreRequest,
    ScoreResponse,
    SequenceScores,
    SpanScores,
    SwapRequest,
    TurnScores,
    TurnVerdict,
)
from services.http import (
    BodyLimitMiddleware,
    FastPathMiddleware,
    LatencyMiddleware,
    ServiceError,
    health_router,
    install_error_handlers,
)
from services.teacher.backends.base import EpisodeItem, JudgeItem, ScoreItem
from services.teacher.batcher import BatchRecord, DeadlineExceeded, Job, MicroBatcher, QueueFull
from services.teacher.registry import (
    BackendFactory,
    LoadedModel,
    ModelRefused,
    ModelRegistry,
    NoModel,
    SourcePolicy,
    default_backend_factory,
)
from services.teacher.settings import TeacherSettings

log = logging.getLogger(__name__)


class TeacherMetrics:
    """Prometheus metrics of one app instance, per model where it matters."""

    def __init__(self, registry_of_models: ModelRegistry, batcher: MicroBatcher) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("sage_teacher_queue_depth", "Jobs waiting", registry=r)
        self.queue_depth.set_function(lambda: batcher.depth)
        self.batch_items = Histogram(
            "sage_teacher_batch_items",
            "Items per forward",
            ["model", "kind"],
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.batch_tokens = Histogram(
            "sage_teacher_batch_tokens",
            "Tokens per forward",
            ["model", "kind"],
            registry=r,
            buckets=(64, 256, 1024, 4096, 16384, 65536),
        )
        self.forward_seconds = Histogram(
            "sage_teacher_forward_seconds", "Time per forward", ["model", "kind"], registry=r
        )
        r.register(_ForwardedTokens(registry_of_models))
        self.requests = Counter(
            "sage_teacher_requests", "Answered requests", ["model", "route"], registry=r
        )
        self.rejections = Counter(
            "sage_teacher_rejections", "Refused requests", ["reason"], registry=r
        )
        self.latency = Histogram(
            "sage_teacher_request_seconds", "Request latency by route", ["route"], registry=r
        )

    def record_batch(self, record: BatchRecord) -> None:
        model, kind = record.key[0].name, record.key[1]
        self.batch_items.labels(model, kind).observe(record.items)
        self.batch_tokens.labels(model, kind).observe(record.tokens)
        self.forward_seconds.labels(model, kind).observe(record.seconds)


class _ForwardedTokens(Collector):
    """Each loaded model's own count of forwarded tokens, read from its backend."""

    def __init__(self, models: ModelRegistry) -> None:
        self.models = models

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "sage_teacher_tokens_forwarded",
            "Tokens the backend ran through its model",
            labels=["model"],
        )
        for model in list(self.models.models.values()):
            family.add_metric([model.name], model.backend.tokens_forwarded)
        yield family


class TeacherService:
    def __init__(self, settings: TeacherSettings, factory: BackendFactory | None = None) -> None:
        self.settings = settings
        policy = SourcePolicy(settings.allowed_roots, settings.allowed_ids)
        if factory is None:

            def factory(request: LoadModelRequest):  # noqa: ANN202
                return default_backend_factory(request, settings.trust_remote_code, settings.device)

        self.models = ModelRegistry(policy, factory)
        self.batcher = MicroBatcher(
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue,
            enabled=settings.batching,
        )
        self.metrics = TeacherMetrics(self.models, self.batcher)
        self.batcher.on_batch = self.metrics.record_batch

    async def run(
        self,
        model: LoadedModel,
        kind: str,
        items: list[Any],
        run: Callable[[list[Any]], list[Any]],
        options: tuple[Any, ...],
        client_id: str,
        deadline_s: float | None,
    ) -> list[Any]:
        """Queue one request's items for the batcher; map its refusals to HTTP errors."""
        _check_size(sum(item.num_tokens for item in items), self.settings.max_request_tokens)
        _check_ids(model, [item.input_ids for item in items])
        deadline = time.monotonic() + (deadline_s or self.settings.default_deadline_s)
        job = Job(
            key=(model, kind, *options),
            items=items,
            run=run,
            client_id=client_id,
            deadline=deadline,
        )
        try:
            return await self.batcher.submit(job)
        except QueueFull as exc:
            self.metrics.rejections.labels("queue_full").inc()
            raise ServiceError(
                503,
                "queue_full",
                "The teacher's queue is full; retry shortly.",
                {"max_queue": self.settings.max_queue},
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from exc
        except DeadlineExceeded as exc:
            self.metrics.rejections.labels("deadline").inc()
            raise ServiceError(
                504, "deadline_exceeded", "The request's deadline passed before it was served."
            ) from exc


def _check_ids(
    model: LoadedModel, sequences: Iterable[Iterable[int]], what: str = "Token ids"
) -> None:
    """422 naming the ids (the first few) that lie outside the model's vocabulary."""
    vocab = model.backend.vocab_size
    bad = sorted({t for ids in sequences for t in ids if not 0 <= t < vocab})
    if bad:
        raise ServiceError(
            422,
            "invalid_token_id",
            f"{what} must lie in [0, {vocab}) for {model.name}; these do not: {bad[:8]}.",
            {"vocab_size": vocab, "invalid_ids": bad[:8]},
        )


def _check_size(tokens: int, limit: int, at_least: bool = False) -> None:
    """413 when a request renders to more tokens than the teacher takes in one request."""
    if tokens > limit:
        count = f"at least {tokens}" if at_least else str(tokens)
        raise ServiceError(
            413,
            "too_many_tokens",
            f"The request renders to {count} tokens; this teacher takes at most {limit} "
            "per request (SAGE_TEACHER_MAX_REQUEST_TOKENS).",
            {"tokens": tokens, "max_request_tokens": limit},
        )


def _check_text(texts: Iterable[str]) -> None:
    """422 for text the tokenizer cannot take: not encodable as UTF-8 (a lone surrogate)."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ServiceError(
                422,
                "invalid_request",
                f"Text must be encodable as UTF-8; {exc.object[exc.start]!r} at character "
                f"{exc.start} is not ({exc.reason}).",
            ) from exc


def _episode_texts(task: str, turns: Sequence[EpisodeTurn]) -> Iterator[str]:
    yield task
    for turn in turns:
        yield turn.observation
        yield turn.feedback
        yield from turn.admissible_actions


def _shown_response_ids(
    turns: Sequence[EpisodeTurn], history: int | None, ends: Iterable[int]
) -> int:
    """Response ids in the context windows that end at turns ``ends``: a floor of the tokens
    rendering them makes, counted without rendering (windows can overlap a lot)."""
    before = list(itertools.accumulate((len(turn.response_ids) for turn in turns), initial=0))
    return sum(before[t + 1] - before[0 if history is None else max(0, t - history)] for t in ends)


async def get_service(request: Request) -> TeacherService:
    return request.app.state.service


Service = Annotated[TeacherService, Depends(get_service)]


MAX_CLIENT_ID_CHARS = 128
ClientIdHeader = Annotated[
    str | None, Header(alias=CLIENT_ID_HEADER, max_length=MAX_CLIENT_ID_CHARS)
]


async def get_client_id(client_id: ClientIdHeader = None) -> str:
    return client_id or "anonymous"


ClientId = Annotated[str, Depends(get_client_id)]


@contextmanager
def hold_model(service: TeacherService) -> Iterator[LoadedModel]:
    """The active model, held while the block runs so a swap drains it first."""
    try:
        model = service.models.acquire()
    except NoModel as exc:
        raise ServiceError(
            503, "no_model", "No teacher model is loaded.", headers={"Retry-After": "5"}
        ) from exc
    try:
        yield model
    finally:
        service.models.release(model)


async def held_model(service: Service) -> AsyncIterator[LoadedModel]:
    """The active model, held for the whole request so a swap drains it first."""
    with hold_model(service) as model:
        yield model


Model = Annotated[LoadedModel, Depends(held_model)]
_bearer = HTTPBearer(auto_error=False)


async def require_admin(
    service: Service,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    if credentials is None:
        raise ServiceError(
            401,
            "unauthorized",
            "Admin routes need a bearer token.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not _is_admin_token(service, credentials.credentials):
        raise ServiceError(403, "forbidden", "The admin token is not valid.")


def _is_admin_token(service: TeacherService, token: str) -> bool:
    expected = service.settings.admin_token
    # As bytes: compare_digest refuses str with non-ASCII characters.
    return expected is not None and secrets.compare_digest(
        token.encode(errors="surrogateescape"), expected.encode(errors="surrogateescape")
    )


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 503, 504)
}
router = APIRouter(prefix=API_PREFIX, responses=_ERRORS)
admin = APIRouter(
    prefix=f"{API_PREFIX}/models", dependencies=[Depends(require_admin)], responses=_ERRORS
)


@router.post("/score", response_model=ScoreResponse)
async def score(
    body: ScoreRequest, service: Service, client_id: ClientIdHeader = None
) -> ScoreResponse:
    return await _score(service, body, client_id)


async def fast_score(service: TeacherService, body: bytes, headers: Headers) -> Response | None:
    """/v1/score for FastPathMiddleware: the route's answer to a JSON body that ScoreRequest
    takes; None (the route answers) for anything else."""
    client_id = headers.get(CLIENT_ID_HEADER)
    if headers.get("content-type") != "application/json" or (
        client_id is not None and len(client_id) > MAX_CLIENT_ID_CHARS
    ):
        return None
    try:
        request = ScoreRequest.model_validate_json(body)
    except ValidationError:
        return None
    answer = await _score(service, request, client_id)
    return Response(answer.model_dump_json(), media_type="application/json")


async def _score(
    service: TeacherService, body: ScoreRequest, client_id: str | None
) -> ScoreResponse:
    """The score route's work, shared with its fast path."""
    with hold_model(service) as model:
        items = [
            ScoreItem(s.input_ids, [(span.start, span.end) for span in s.spans])
            for s in body.sequences
        ]
        results = await service.run(
            model,
            "score",
            items,
            lambda chunk: model.backend.score(chunk, body.top_k),
            (body.top_k,),
            client_id or "anonymous",
            body.deadline_s,
        )
        service.metrics.requests.labels(model.name, "score").inc()
        return ScoreResponse(
            model=model.ref,
            sequences=[SequenceScores(spans=spans) for spans in results],
            tokens_forwarded=sum(item.num_tokens for item in items),
        )


def _verdict(probs: list[float]) -> TurnVerdict:
    by_label = dict(zip(LABELS, probs, strict=True))
    return TurnVerdict(label=max(by_label, key=by_label.get), probs=by_label)


@router.post("/judge", response_model=JudgeResponse)
async def judge(
    body: JudgeRequest, service: Service, model: Model, client: ClientId
) -> JudgeResponse:
    for e in body.episodes:
        _check_text(_episode_texts(e.task, e.turns))
    shown = sum(
        _shown_response_ids(e.turns, body.history, [len(e.turns) - 1]) for e in body.episodes
    )
    _check_size(shown, service.settings.max_request_tokens, at_least=True)
    items = [
        JudgeItem(model.renderer.judge_prompt(e.task, e.turns, body.history)) for e in body.episodes
    ]
    results = await service.run(
        model,
        "judge",
        items,
        lambda chunk: model.backend.label_probs(chunk, model.label_ids),
        (),
        client,
        body.deadline_s,
    )
    service.metrics.requests.labels(model.name, "judge").inc()
    return JudgeResponse(
        model=model.ref,
        verdicts=[_verdict(p) for p in results],
        tokens_forwarded=sum(item.num_tokens for item in items),
    )


@router.post("/episode", response_model=EpisodeResponse)
async def score_episode(
    body: EpisodeRequest, service: Service, model: Model, client: ClientId
) -> EpisodeResponse:
    """Score every response token and judge every turn, with cost linear in the turns.

    With the whole history the episode is one sequence (one forward, judge
    branches inside it); with a window of k turns, one sequence per turn.
    """
    _check_text(_episode_texts(body.task, body.turns))
    # One context (whole history) or one per turn (a window): refused before rendering
    # when their response ids alone are over the limit.
    ends = [len(body.turns) - 1] if body.history is None else range(len(body.turns))
    shown = _shown_response_ids(body.turns, body.history, ends)
    _check_size(shown, service.settings.max_request_tokens, at_least=True)
    renderer = model.renderer
    contexts = renderer.contexts(body.task, body.turns, body.history)
    items = [
        EpisodeItem(
            c.input_ids,
            c.spans,
            [renderer.judge_suffix(body.turns[: t + 1]) for t in c.turns] if body.judge else None,
        )
        for c in contexts
    ]
    results = await service.run(
        model,
        "episode",
        items,
        lambda chunk: model.backend.score_episodes(chunk, body.top_k, model.label_ids),
        (body.top_k,),
        client,
        body.deadline_s,
    )
    service.metrics.requests.labels(model.name, "episode").inc()
    turns: list[TurnScores | None] = [None] * len(body.turns)
    for context, result in zip(contexts, results, strict=True):
        probs = result.label_probs or [None] * len(context.turns)
        for t, scores, p in zip(context.turns, result.spans, probs, strict=True):
            turns[t] = TurnScores(scores=scores, verdict=_verdict(p) if p is not None else None)
    return EpisodeResponse(
        model=model.ref, turns=turns, tokens_forwarded=sum(item.num_tokens for item in items)
    )


@router.get("/models", response_model=ModelList)
async def list_models(service: Service, request: Request) -> ModelList:
    """The loaded models; where a local model lives only for a caller with the admin token.

    The token is read by calling the bearer scheme here, not as a dependency, so the
    route stays open to every caller in the OpenAPI description."""
    credentials = await _bearer(request)
    admin = credentials is not None and _is_admin_token(service, credentials.credentials)
    return ModelList(models=service.models.infos(public=not admin))


_REFUSALS = {
    403: "model_not_allowed",
    404: "model_not_found",
    409: "conflict",
    422: "model_unusable",
}


def _refused(exc: ModelRefused) -> ServiceError:
    code = _REFUSALS[exc.status]
    return ServiceError(exc.status, code, str(exc))


@admin.post("/load", response_model=ModelInfo)
async def load_model(body: LoadModelRequest, service: Service) -> ModelInfo:
    """Load and warm a model beside the serving one (``activate``: then swap to it)."""
    try:
        return await service.models.load(body)
    except ModelRefused as exc:
        raise _refused(exc) from exc


@admin.post("/swap", response_model=ModelInfo)
async def swap_model(body: SwapRequest, service: Service) -> ModelInfo:
    try:
        return await service.models.swap(body.name)
    except KeyError as exc:
        raise ServiceError(404, "model_not_found", f"No loaded model {body.name!r}.") from exc


@admin.delete("/{name}", status_code=204)
async def unload_model(name: str, service: Service) -> Response:
    try:
        await service.models.unload(name)
    except KeyError as exc:
        raise ServiceError(404, "model_not_found", f"No loaded model {name!r}.") from exc
    except ModelRefused as exc:
        raise _refused(exc) from exc
    return Response(status_code=204)


# --------------------------------------------------------------------------- OpenAI-compatible


def _prompts(body: CompletionRequest, model: LoadedModel, limit: int) -> list[list[int]]:
    """The prompts as token ids, checked before any work: text encodable as UTF-8, each
    prompt non-empty, ids (and allowed_token_ids) in the vocabulary, and the prompts
    with their new tokens within ``limit``."""
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(x, int) for x in prompt):
        prompt = [prompt]
    _check_text(p for p in prompt if isinstance(p, str))
    prompts = [model.backend.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ServiceError(422, "invalid_request", "Each prompt needs at least one token.")
    new_tokens = 1 if body.allowed_token_ids is not None else body.max_tokens
    _check_size(sum(len(p) + new_tokens for p in prompts), limit)
    _check_ids(model, prompts)
    if body.allowed_token_ids is not None:
        _check_ids(model, [body.allowed_token_ids], "allowed_token_ids")
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


def create_app(
    settings: TeacherSettings | None = None, factory: BackendFactory | None = None
) -> FastAPI:
    """Build the teacher service (settings default to SAGE_TEACHER_* variables).

    ``settings.model`` is loaded at start-up; the operator named it, so its folder
    joins the allowed roots.
    """
    settings = settings or TeacherSettings()
    service = TeacherService(settings, factory)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        if settings.model:
            from pathlib import Path

            if Path(settings.model).exists():
                service.models.policy.allow_root(settings.model)
            await service.models.load(
                LoadModelRequest(
                    name=settings.model_name,
                    source=settings.model,
                    revision=settings.revision,
                    gguf_file=settings.gguf_file,
                    dtype=settings.dtype,  # type: ignore[arg-type]
                    backend=settings.backend,  # type: ignore[arg-type]
                    trust_remote_code=settings.trust_remote_code,
                    activate=True,
                ),
                check_policy=False,
            )
        try:
            yield
        finally:
            await service.batcher.stop()
            await service.models.close()

    app = FastAPI(title="SAGE-OPD teacher service", version="1", lifespan=lifespan)
    app.state.service = service
    # The score route's common case skips FastAPI's per-request work: innermost, so the
    # error, body limit and latency middleware below still wrap it.
    app.add_middleware(
        FastPathMiddleware, handlers={f"{API_PREFIX}/score": partial(fast_score, service)}
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(LatencyMiddleware, histogram=service.metrics.latency)
    app.include_router(router)
    app.include_router(admin)
    app.include_router(
        health_router(
            service.metrics.registry,
            lambda: "No teacher model is loaded yet." if service.models.active is None else None,
            retry_after_s=2,
        )
    )
    return app
