"""The teacher's native routes: score (with the fast path FastPathMiddleware takes),
judge, the fused episode call, and the list of loaded models.

Routes translate the wire models into backend work (token ids and spans), hand
it to the micro-batcher, and translate the numbers back. Every answer names the
model and revision that produced it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from starlette.datastructures import Headers

from client.protocol import (
    API_PREFIX,
    CLIENT_ID_HEADER,
    LABELS,
    EpisodeRequest,
    EpisodeResponse,
    EpisodeTurn,
    JudgeRequest,
    JudgeResponse,
    ModelList,
    ScoreRequest,
    ScoreResponse,
    SequenceScores,
    TurnScores,
    TurnVerdict,
)
from services.teacher.backends.base import EpisodeItem, JudgeItem, ScoreItem
from services.teacher.deps import (
    MAX_CLIENT_ID_CHARS,
    ClientId,
    ClientIdHeader,
    Model,
    Service,
    bearer,
    is_admin_token,
)
from services.teacher.limits import check_size, check_text
from services.teacher.routes import ERRORS
from services.teacher.service import TeacherService, hold_model

router = APIRouter(prefix=API_PREFIX, responses=ERRORS)


def _episode_texts(task: str, turns: Sequence[EpisodeTurn]) -> Iterator[str]:
    yield task
    for turn in turns:
        yield turn.observation
        yield turn.feedback
        yield from turn.admissible_actions
        if turn.response_text is not None:
            yield turn.response_text


def _shown_response_ids(
    turns: Sequence[EpisodeTurn], history: int | None, ends: Iterable[int]
) -> int:
    """Response ids in the context windows that end at turns ``ends``: a floor of the tokens
    rendering them makes, counted without rendering (windows can overlap a lot)."""
    before = list(itertools.accumulate((len(turn.response_ids) for turn in turns), initial=0))
    return sum(before[t + 1] - before[0 if history is None else max(0, t - history)] for t in ends)


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
        check_text(_episode_texts(e.task, e.turns))
    episodes = [(e.task, model.renderer.own_ids(e.turns)[0]) for e in body.episodes]
    shown = sum(_shown_response_ids(turns, body.history, [len(turns) - 1]) for _, turns in episodes)
    check_size(shown, service.settings.max_request_tokens, at_least=True)
    items = [
        JudgeItem(model.renderer.judge_prompt(task, turns, body.history))
        for task, turns in episodes
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
    check_text(_episode_texts(body.task, body.turns))
    renderer = model.renderer
    # Text responses in this model's own tokens (offsets: where each ends in its text).
    own, offsets = renderer.own_ids(body.turns)
    # One context (whole history) or one per turn (a window): refused before rendering
    # when their response ids alone are over the limit.
    ends = [len(own) - 1] if body.history is None else range(len(own))
    shown = _shown_response_ids(own, body.history, ends)
    check_size(shown, service.settings.max_request_tokens, at_least=True)
    contexts = renderer.contexts(body.task, own, body.history)
    items = [
        EpisodeItem(
            c.input_ids,
            c.spans,
            [renderer.judge_suffix(own[: t + 1]) for t in c.turns] if body.judge else None,
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
            if offsets[t] is not None:
                scores = scores.model_copy(update={"offsets": offsets[t]})
            turns[t] = TurnScores(scores=scores, verdict=_verdict(p) if p is not None else None)
    return EpisodeResponse(
        model=model.ref, turns=turns, tokens_forwarded=sum(item.num_tokens for item in items)
    )


@router.get("/models", response_model=ModelList)
async def list_models(service: Service, request: Request) -> ModelList:
    """The loaded models; where a local model lives only for a caller with the admin token.

    The token is read by calling the bearer scheme here, not as a dependency, so the
    route stays open to every caller in the OpenAPI description."""
    credentials = await bearer(request)
    admin = credentials is not None and is_admin_token(service, credentials.credentials)
    return ModelList(models=service.models.infos(public=not admin))
