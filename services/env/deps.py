"""The env service's route dependencies: the app's EnvService, taken from the request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.env.service import EnvService


async def get_service(request: Request) -> EnvService:
    # async: a plain def dependency would be run in a worker thread on every request.
    return request.app.state.service


Service = Annotated[EnvService, Depends(get_service)]
