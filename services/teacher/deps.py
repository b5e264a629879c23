"""The teacher routes' FastAPI dependencies: the service, the caller's client id, the
active model held for the request, and the admin-token check."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from client.protocol import CLIENT_ID_HEADER
from services.http import ServiceError
from services.teacher.registry import LoadedModel
from services.teacher.service import TeacherService, hold_model


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


async def held_model(service: Service) -> AsyncIterator[LoadedModel]:
    """The active model, held for the whole request so a swap drains it first."""
    with hold_model(service) as model:
        yield model


Model = Annotated[LoadedModel, Depends(held_model)]
bearer = HTTPBearer(auto_error=False)


async def require_admin(
    service: Service,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    if credentials is None:
        raise ServiceError(
            401,
            "unauthorized",
            "Admin routes need a bearer token.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not is_admin_token(service, credentials.credentials):
        raise ServiceError(403, "forbidden", "The admin token is not valid.")


def is_admin_token(service: TeacherService, token: str) -> bool:
    expected = service.settings.admin_token
    # As bytes: compare_digest refuses str with non-ASCII characters.
    return expected is not None and secrets.compare_digest(
        token.encode(errors="surrogateescape"), expected.encode(errors="surrogateescape")
    )
