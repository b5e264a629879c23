"""Single calls made side by side, sent to a service as one batch call.

Episodes run as coroutines, each stepping its own session: one request per step
would cost far more in the HTTP client than the step costs the service. A
:class:`Coalescer` keeps one batch request in flight at a time: calls made while
it is out wait, and go together in the next one. Each caller gets its own
answer, or its own error. A caller alone waits one turn of the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

I = TypeVar("I")  # noqa: E741 - an item of a batch
R = TypeVar("R")

# A batch send gives, per item, its answer or the exception its caller gets.
Send = Callable[[list[I]], Awaitable[list["R | Exception"]]]


class Coalescer(Generic[I, R]):
    """``await coalescer(item)``: the item's answer from a batch ``send`` shared with others.

    A batch holds each ``key`` once (a service may refuse a batch naming a session
    twice) and at most ``max_batch`` items; batches go out one after another, in the
    order of the calls. A failure of the whole call reaches every caller in its batch.
    """

    def __init__(
        self, send: Send[I, R], key: Callable[[I], Hashable], max_batch: int = 256
    ) -> None:
        self._send = send
        self._key = key
        self._max_batch = max_batch
        self._pending: list[tuple[I, asyncio.Future[R]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def __call__(self, item: I) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._sender is None:
            self._sender = asyncio.ensure_future(self._send_pending())
        return await future

    async def _send_pending(self) -> None:
        try:
            while True:
                await asyncio.sleep(0)  # the callers already woken join this batch
                if not self._pending:
                    return
                pending, self._pending = self._pending, []
                for batch in self._batches(pending):
                    await self._deliver(batch)
        except asyncio.CancelledError:  # the loop is going away: nobody is left to answer
            for _, future in self._pending:
                future.cancel()
            self._pending = []
            raise
        finally:
            self._sender = None

    def _batches(
        self, pending: list[tuple[I, asyncio.Future[R]]]
    ) -> list[list[tuple[I, asyncio.Future[R]]]]:
        """``pending`` in order, in batches that hold each key once and at most max_batch."""
        batches: list[list[tuple[I, asyncio.Future[R]]]] = []
        keys: list[set[Hashable]] = []
        for item, future in pending:
            key = self._key(item)
            slot = next(
                (
                    i
                    for i, seen in enumerate(keys)
                    if key not in seen and len(batches[i]) < self._max_batch
                ),
                None,
            )
            if slot is None:
                slot = len(batches)
                batches.append([])
                keys.append(set())
            batches[slot].append((item, future))
            keys[slot].add(key)
        return batches

    async def _deliver(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        try:
            outcomes = await self._send([item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            outcomes = [exc] * len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
