"""HTTP plumbing shared by both services: error bodies, body limits, serving.

Every error leaves a service as ``ErrorBody`` JSON ({code, message, detail}),
whether a route raised it, FastAPI's validation refused the body, or the body
was too large to read.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from client.protocol import ErrorBody

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error a route means to answer with: status, code, message, detail, headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(code=code, message=message, detail=detail)
        self.headers = headers or {}


def error_response(
    status: int, code: str, message: str, detail: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody(code=code, message=message, detail=detail)
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
    504: "deadline_exceeded",
}


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error, ours or the framework's, with an ErrorBody."""

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return service_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        return error_response(422, "invalid_request", "The request body is not valid.", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            exc.headers = {**(exc.headers or {}), "Allow": allowed_methods(request)}
        return http_error_response(exc)

    # Unexpected exceptions are answered inside the app (UnexpectedErrorMiddleware), so
    # uvicorn never sees them and keeps the connection open. Starlette's outermost
    # ServerErrorMiddleware would answer too, but then re-raise: uvicorn closes the
    # connection. This handler stays only for errors raised outside that middleware.
    app.add_middleware(UnexpectedErrorMiddleware)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _internal_error()


def allowed_methods(request: Request) -> str:
    """The methods of the URL's route for a 405's Allow header. Starlette names only the
    first route whose path matches; this takes the most literal such path (
    /v1/sessions/step over /v1/sessions/{session_id}) and every method routed on it."""
    path = request.url.path
    matching = [
        r for r in request.app.routes if isinstance(r, APIRoute) and r.path_regex.match(path)
    ]
    if not matching:
        return ""
    template = min((route.path for route in matching), key=lambda text: text.count("{"))
    methods = {m for route in matching if route.path == template for m in route.methods}
    return ", ".join(sorted(methods))


def service_error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse(
        exc.body.model_dump(mode="json"), status_code=exc.status, headers=exc.headers
    )


def http_error_response(exc: StarletteHTTPException) -> JSONResponse:
    code = _STATUS_CODES.get(exc.status_code, "error")
    return error_response(exc.status_code, code, str(exc.detail), None, exc.headers)


def _internal_error() -> JSONResponse:
    return error_response(500, "internal_error", "The service failed on this request.")


class UnexpectedErrorMiddleware:
    """Answer an exception no handler took with a 500 ErrorBody, and log its traceback.

    The exception goes no further, so the server keeps the keep-alive connection
    open for the client's next request. When the response had already started,
    nothing can be answered any more: the exception is re-raised and the server
    closes the connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await _internal_error()(scope, receive, send)


FastHandler = Callable[[bytes, Headers], Awaitable[Response | None]]


class FastPathMiddleware:
    """Serve the common case of chosen POST routes without FastAPI's per-request work.

    FastAPI's routing, dependencies and validation take about 40% of the event loop's
    time per score request with a small model. For a POST to a path of ``handlers``
    with a Content-Length (held to the body limit already), the handler gets the body
    and the headers and answers, or returns None to leave the request to the app (the
    body is handed on), whose answer, errors included, is then exactly the route's. A
    ServiceError from the handler is answered as the app answers it; the request is
    labelled with its route's path, as the router would (the paths have no parameters).
    Add it before the other middleware, so that it runs inside them.
    """

    def __init__(self, app: ASGIApp, handlers: dict[str, FastHandler]) -> None:
        self.app = app
        self.handlers = handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = None
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.handlers.get(scope["path"])
        headers = Headers(scope=scope) if handler is not None else Headers()
        if handler is None or "content-length" not in headers:
            await self.app(scope, receive, send)
            return
        scope["route"] = _PathRoute(scope["path"])  # what LatencyMiddleware reads
        try:
            body = await _read_body(receive)
            if body is None:
                return  # the client left
            response = await handler(body, headers)
        except StarletteHTTPException as exc:
            response = http_error_response(exc)
        except ServiceError as exc:
            response = service_error_response(exc)
        if response is None:
            await self.app(scope, _replay(body, receive), send)
        else:
            await response(scope, receive, send)


@dataclass(frozen=True)
class _PathRoute:
    """The route a fast path served, as far as ``scope["route"]`` is read: its path."""

    path: str


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client disconnects first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives ``body`` (already read) first, then waits on ``receive``."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, before a route reads them.

    Checks the declared Content-Length first and then counts the bytes actually
    received, so a chunked body cannot slip past the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises HTTPException from body parsing; the handler
                    # above turns it into the same 413 ErrorBody.
                    raise StarletteHTTPException(413, self._message)
            return message

        await self.app(scope, limited_receive, send)

    @property
    def _message(self) -> str:
        return f"The request body exceeds {self.max_bytes} bytes."

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, "payload_too_large", self._message, {"max_bytes": self.max_bytes}
        )
        await response(scope, receive, send)


class LatencyMiddleware:
    """Observe each request's latency in a histogram labelled by its route template."""

    def __init__(self, app: ASGIApp, histogram: Any) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            # The router writes the matched route into the shared scope.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.histogram.labels(route).observe(time.perf_counter() - start)


def health_router(
    registry: Any, not_ready: Callable[[], str | None], retry_after_s: int = 1
) -> APIRouter:
    """/healthz (alive), /readyz (503 with the reason while ``not_ready()`` gives one),
    and /metrics (Prometheus text of ``registry``): the same three routes on every service."""
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/readyz",
        response_class=PlainTextResponse,
        responses={503: {"model": ErrorBody, "description": "Not ready; see the message"}},
    )
    async def readyz() -> Response:
        reason = not_ready()
        if reason is not None:
            raise ServiceError(
                503, "not_ready", reason, headers={"Retry-After": str(retry_after_s)}
            )
        return PlainTextResponse("ready")

    @router.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
    )
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router


# How long an idle keep-alive connection stays open: longer than the clients keep one
# (client/http.py KEEPALIVE_EXPIRY_S), so a client never sends on a connection the
# server is closing at that moment (uvicorn's default, 5 s, equals httpx's default).
KEEP_ALIVE_S = 75


def serve(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Run ``app`` under uvicorn until interrupted."""
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_S,
    )


@contextmanager
def running_server(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 300.0
) -> Iterator[str]:
    """Serve ``app`` with a real uvicorn in a background thread (port 0: a free one).

    Yields the base URL; stops the server (running its lifespan shutdown) on exit.
    Used by tests, benchmarks and in-process tools.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start within {start_timeout_s:.0f}s")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
