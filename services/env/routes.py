"""The env service's routes under API_PREFIX: the environments, and sessions one at a
time or in batches, per the contract in client/protocol.py.

Routes are thin: they translate between the wire models and the session store
(through EnvService, services/env/service.py). A batch route answers each item with
its own result or error.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from pydantic_core import to_json

from client.protocol import (
    API_PREFIX,
    AdmissibleActions,
    BatchExpertRequest,
    BatchExpertResponse,
    BatchStepRequest,
    BatchStepResponse,
    CloseSessionsRequest,
    CloseSessionsResponse,
    CreateSessionRequest,
    CreateSessionsRequest,
    CreateSessionsResponse,
    EnvironmentInfo,
    EnvironmentList,
    ErrorBody,
    ExpertAction,
    SessionCreated,
    SessionInfo,
    StepRequest,
    StepResult,
)
from services.env.deps import Service
from services.env.service import expert, step, step_result, task_info
from services.http import ServiceError


def _json(payload: Any, status_code: int = 200) -> Response:
    # pydantic-core's serialiser: several times faster than json.dumps on large answers.
    return Response(to_json(payload), status_code=status_code, media_type="application/json")


def _error_item(exc: ServiceError, **fields: Any) -> dict[str, Any]:
    return {
        **fields,
        "result": None,
        "error": exc.body.model_dump(mode="json"),
        "status": exc.status,
    }


router = APIRouter(prefix=API_PREFIX)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 404, 409, 413, 422, 502, 503)
}


@router.get("/envs", response_model=EnvironmentList)
async def list_environments(service: Service) -> EnvironmentList:
    names = service.settings.environment_names()
    return EnvironmentList(
        environments=[
            EnvironmentInfo(name=name, splits=service.family(name).splits()) for name in names
        ]
    )


@router.post("/sessions", response_model=SessionCreated, status_code=201, responses=_ERRORS)
async def create_session(body: CreateSessionRequest, service: Service) -> dict[str, Any]:
    return await service.open_session(body)


@router.post(
    "/sessions/batch", response_model=CreateSessionsResponse, status_code=201, responses=_ERRORS
)
async def create_sessions(body: CreateSessionsRequest, service: Service) -> Response:
    """Open many sessions in one call; each item carries its session or its own error."""

    async def one(request: CreateSessionRequest) -> dict[str, Any]:
        try:
            return {"result": await service.open_session(request), "error": None, "status": 201}
        except ServiceError as exc:
            return _error_item(exc)

    items = await service.each(one(request) for request in body.sessions)
    return _json({"results": items}, status_code=201)


@router.post("/sessions/close", response_model=CloseSessionsResponse, responses=_ERRORS)
async def close_sessions(body: CloseSessionsRequest, service: Service) -> CloseSessionsResponse:
    """Close many sessions in one call; ids that are not live are listed, not an error."""
    closed, not_found = [], []
    for session_id in body.session_ids:
        try:
            await service.close_session(session_id)
            closed.append(session_id)
        except ServiceError:
            not_found.append(session_id)
    return CloseSessionsResponse(closed=closed, not_found=not_found)


@router.get("/sessions/{session_id}", response_model=SessionInfo, responses=_ERRORS)
async def session_info(session_id: str, service: Service) -> SessionInfo:
    session = service.session(session_id)
    return SessionInfo(
        session_id=session.id,
        task=task_info(session),
        turn=session.turn,
        done=session.done,
        won=session.won,
    )


@router.post("/sessions/{session_id}/reset", response_model=StepResult, responses=_ERRORS)
async def reset_session(session_id: str, service: Service) -> dict[str, Any]:
    session = service.session(session_id)
    outcome = await service.run(session, session.reset)
    return step_result(session, outcome)


@router.post("/sessions/{session_id}/step", response_model=StepResult, responses=_ERRORS)
async def step_session(session_id: str, body: StepRequest, service: Service) -> dict[str, Any]:
    return await step(service, service.session(session_id), body.action)


@router.post("/sessions/step", response_model=BatchStepResponse, responses=_ERRORS)
async def step_sessions(body: BatchStepRequest, service: Service) -> Response:
    """Step many sessions in one call; each item carries its own result or error."""

    async def one(session_id: str, action: str) -> dict[str, Any]:
        try:
            result = await step(service, service.session(session_id), action)
            return {"session_id": session_id, "result": result, "error": None, "status": 200}
        except ServiceError as exc:
            return _error_item(exc, session_id=session_id)

    items = await service.each(one(s.session_id, s.action) for s in body.steps)
    return _json({"results": items})


@router.get(
    "/sessions/{session_id}/admissible", response_model=AdmissibleActions, responses=_ERRORS
)
async def admissible_actions(session_id: str, service: Service) -> AdmissibleActions:
    session = service.session(session_id)
    actions = await service.run(session, session.episode.admissible_actions)
    return AdmissibleActions(session_id=session.id, admissible_actions=actions)


@router.get("/sessions/{session_id}/expert", response_model=ExpertAction, responses=_ERRORS)
async def expert_action(
    session_id: str, service: Service, steps_left: bool = False
) -> dict[str, Any]:
    """The expert's next action; with ``?steps_left=true`` also its remaining steps
    (the environment plays its expert out on a copy, so only callers who need it pay)."""
    return await expert(service, service.session(session_id), steps_left)


@router.post("/sessions/expert", response_model=BatchExpertResponse, responses=_ERRORS)
async def expert_actions(body: BatchExpertRequest, service: Service) -> Response:
    """The expert's next action in many sessions in one call; each item carries its own
    answer or error."""

    async def one(session_id: str) -> dict[str, Any]:
        try:
            result = await expert(service, service.session(session_id), body.steps_left)
            return {"session_id": session_id, "result": result, "error": None, "status": 200}
        except ServiceError as exc:
            return _error_item(exc, session_id=session_id)

    items = await service.each(one(session_id) for session_id in body.session_ids)
    return _json({"results": items})


@router.delete("/sessions/{session_id}", status_code=204, responses=_ERRORS)
async def close_session(session_id: str, service: Service) -> Response:
    await service.close_session(session_id)
    return Response(status_code=204)
