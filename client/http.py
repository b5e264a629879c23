"""An async JSON client with the contract's error model and retries, shared by both clients.

Retries (tenacity, capped exponential backoff with jitter) cover what is safe to
repeat: a 503 (the service refused before doing anything; its Retry-After is
honoured) and a connection that could not be made. A request that may have reached
the service is retried only when it is idempotent. Retries go on until the policy's
time budget is spent, so a service that is restarting (a killed teacher takes tens
of seconds to load its model again) is waited for, with a warning in the log.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)

from client.protocol import CLIENT_ID_HEADER, ErrorBody

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger(__name__)

# An idle pooled connection is dropped after this long: below the services' keep-alive
# (services/http.py KEEP_ALIVE_S), so that the server never closes a connection just as
# the client reuses it (a ReadError on a request that may not be retried).
KEEPALIVE_EXPIRY_S = 30.0

_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_MAYBE_SENT = (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError)


class ServiceCallError(Exception):
    """A service answered with an error status; ``error`` is its ErrorBody."""

    def __init__(self, status: int, error: ErrorBody, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status} {error.code}: {error.message}")
        self.status = status
        self.error = error
        self.retry_after_s = retry_after_s


# While a call keeps retrying, a warning at most this often (many calls wait at once).
WARN_EVERY_S = 5.0


@dataclass(frozen=True)
class RetryPolicy:
    """When a call is tried again: waits from ``initial_wait_s`` doubling up to
    ``max_wait_s`` (plus jitter), until ``max_total_s`` has passed since the first try.

    ``attempts``: None, no limit but the time; a number, at most that many tries
    (1: never retry, for callers that want the first answer as it is)."""

    attempts: int | None = None
    initial_wait_s: float = 0.2
    max_wait_s: float = 5.0
    max_total_s: float = 120.0  # give up after this long in all


class JsonClient:
    """Base of EnvClient and TeacherClient: one httpx.AsyncClient, typed calls, retries.

    The connection pool is kept small on purpose: httpcore checks every pooled
    connection on each request, so hundreds of connections cost more than they
    give; requests beyond ``max_connections`` wait for a free one.
    """

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        client_id: str | None = None,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 16,
    ) -> None:
        all_headers = dict(headers or {})
        if client_id:
            all_headers[CLIENT_ID_HEADER] = client_id
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._warned_at = -WARN_EVERY_S  # time.monotonic() of the last retry warning
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            headers=all_headers,
            transport=transport,
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=KEEPALIVE_EXPIRY_S,
            ),
        )

    async def __aenter__(self) -> JsonClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def ready(self) -> bool:
        """One look at /readyz, no retries: True when the service says it is ready."""
        try:
            response = await self._http.get("/readyz")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def call(
        self,
        method: str,
        path: str,
        response_model: type[M] | None = None,
        body: BaseModel | None = None,
        idempotent: bool = False,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
    ) -> M | None:
        """Send one request (retrying what is safe to retry) and parse the answer."""

        def retryable(exc: BaseException) -> bool:
            if isinstance(exc, ServiceCallError):
                return exc.status == 503
            if isinstance(exc, _NEVER_SENT):
                return True
            return idempotent and isinstance(exc, _MAYBE_SENT)

        policy = self.retry
        backoff = wait_exponential_jitter(
            multiplier=policy.initial_wait_s, max=policy.max_wait_s, jitter=policy.initial_wait_s
        )

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, ServiceCallError) and exc.retry_after_s is not None:
                pause = min(exc.retry_after_s, policy.max_wait_s)
            else:
                pause = backoff(state)
            # Never sleep past the budget: the last try comes as it runs out.
            return max(0.0, min(pause, policy.max_total_s - state.seconds_since_start))

        def stop(state: RetryCallState) -> bool:
            if state.seconds_since_start >= policy.max_total_s:
                return True
            return policy.attempts is not None and state.attempt_number >= policy.attempts

        def warn(state: RetryCallState) -> None:
            now = time.monotonic()
            if now - self._warned_at < WARN_EVERY_S:
                return
            self._warned_at = now
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "%s %s%s failed (%s); retrying for up to %.0fs more",
                method,
                self.base_url,
                path,
                _describe(exc),
                policy.max_total_s - state.seconds_since_start,
            )

        content = body.model_dump_json().encode() if body is not None else None
        send_headers = {"Content-Type": "application/json"} if content is not None else {}
        send_headers.update(headers or {})
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(retryable),
            wait=wait,
            stop=stop,
            before_sleep=warn,
            reraise=True,
        ):
            with attempt:
                response = await self._http.request(
                    method, path, content=content, headers=send_headers, params=params
                )
                if response.status_code >= 400:
                    raise _error_from(response)
        if response_model is None or response.status_code == 204:
            return None
        return response_model.model_validate_json(response.content)


def _describe(exc: BaseException | None) -> str:
    """An exception as a short phrase for the log (httpx's messages may be empty)."""
    if exc is None:
        return "no answer"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _error_from(response: httpx.Response) -> ServiceCallError:
    try:
        error = ErrorBody.model_validate_json(response.content)
    except ValidationError:
        error = ErrorBody(code="http_error", message=response.text[:500] or response.reason_phrase)
    retry_after = response.headers.get("Retry-After")
    try:
        retry_after_s = float(retry_after) if retry_after is not None else None
    except ValueError:
        retry_after_s = None
    return ServiceCallError(response.status_code, error, retry_after_s)
