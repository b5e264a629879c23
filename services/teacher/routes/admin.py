"""The teacher's admin routes, behind the admin bearer token: load, swap and unload models."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from client.protocol import API_PREFIX, LoadModelRequest, ModelInfo, SwapRequest
from services.http import ServiceError
from services.teacher.deps import Service, require_admin
from services.teacher.registry import ModelRefused
from services.teacher.routes import ERRORS

router = APIRouter(
    prefix=f"{API_PREFIX}/models", dependencies=[Depends(require_admin)], responses=ERRORS
)


_REFUSALS = {
    403: "model_not_allowed",
    404: "model_not_found",
    409: "conflict",
    422: "model_unusable",
}


def _refused(exc: ModelRefused) -> ServiceError:
    code = _REFUSALS[exc.status]
    return ServiceError(exc.status, code, str(exc))


@router.post("/load", response_model=ModelInfo)
async def load_model(body: LoadModelRequest, service: Service) -> ModelInfo:
    """Load and warm a model beside the serving one (``activate``: then swap to it)."""
    try:
        return await service.models.load(body)
    except ModelRefused as exc:
        raise _refused(exc) from exc


@router.post("/swap", response_model=ModelInfo)
async def swap_model(body: SwapRequest, service: Service) -> ModelInfo:
    try:
        return await service.models.swap(body.name)
    except KeyError as exc:
        raise ServiceError(404, "model_not_found", f"No loaded model {body.name!r}.") from exc


@router.delete("/{name}", status_code=204)
async def unload_model(name: str, service: Service) -> Response:
    try:
        await service.models.unload(name)
    except KeyError as exc:
        raise ServiceError(404, "model_not_found", f"No loaded model {name!r}.") from exc
    except ModelRefused as exc:
        raise _refused(exc) from exc
    return Response(status_code=204)
