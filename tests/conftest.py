"""Shared fixtures: real services under uvicorn on free loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack

import pytest

from services.http import running_server


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """serve(app) -> base URL of a real uvicorn serving it; stopped after the test."""
    with ExitStack() as stack:

        def start(app) -> str:  # noqa: ANN001
            server: AbstractContextManager[str] = running_server(app)
            return stack.enter_context(server)

        yield start
