"""Micro-batching: requests from many clients gathered into few forwards, fairly.

Jobs wait in one queue per client. A batch is formed by taking one job per
client in turn (round robin), all of the same model and kind, until the batch
holds ``max_batch_tokens`` or nothing more is waiting, after at most
``max_wait_s`` of gathering. Its items are sorted by length and cut into chunks
of at most ``max_batch_tokens`` padded tokens, and each chunk is forwarded in a
worker thread so the event loop keeps accepting requests. The queue is bounded
(``QueueFull`` -> 503) and every job has a deadline (``DeadlineExceeded`` -> 504).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


class DeadlineExceeded(Exception):
    pass


@dataclass(eq=False)
class Job:
    """One request's work: items for one backend method of one model."""

    key: tuple[Any, ...]  # (model, kind, options): only jobs with equal keys share a batch
    items: Sequence[Any]  # each has .num_tokens
    run: Callable[[list[Any]], list[Any]]  # the backend call for a chunk of items (blocking)
    client_id: str
    deadline: float  # time.monotonic()
    future: asyncio.Future = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)


@dataclass(frozen=True)
class BatchRecord:
    """What one forward held, for metrics."""

    key: tuple[Any, ...]
    items: int
    tokens: int
    padded_tokens: int
    seconds: float


class MicroBatcher:
    def __init__(
        self,
        max_batch_tokens: int = 8192,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
        enabled: bool = True,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.enabled = enabled
        self.on_batch = on_batch
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()  # client -> jobs, in turn order
        self._waiting = 0
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the batch being forwarded)."""
        return self._waiting

    def start(self) -> None:
        self._worker = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for queue in self._queues.values():
            for job in queue:
                if not job.future.done():
                    job.future.set_exception(QueueFull("the service is shutting down"))
        self._queues.clear()

    async def submit(self, job: Job) -> list[Any]:
        """Queue ``job`` and wait for its results (in item order)."""
        if self._waiting >= self.max_queue:
            raise QueueFull(f"{self._waiting} jobs are waiting")
        self._queues.setdefault(job.client_id, deque()).append(job)
        self._waiting += 1
        self._wakeup.set()
        remaining = job.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=max(remaining, 0))
        except TimeoutError as exc:
            raise DeadlineExceeded("the request's deadline passed") from exc
        except asyncio.CancelledError:
            job.future.cancel()  # the caller left: drop the job if it has not run yet
            raise

    # ------------------------------------------------------------------ the worker

    async def _loop(self) -> None:
        while True:
            if self._waiting == 0:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.enabled:
                await self._gather()
            batch = self._take_batch()
            if batch:
                await self._run(batch)

    async def _gather(self) -> None:
        """Wait briefly for more work, unless a full batch is already waiting."""
        deadline = time.monotonic() + self.max_wait_s
        while time.monotonic() < deadline:
            if sum(job.tokens for q in self._queues.values() for job in q) >= self.max_batch_tokens:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), deadline - time.monotonic())

    def _pop(self, client: str) -> Job:
        job = self._queues[client].popleft()
        self._waiting -= 1
        if not self._queues[client]:
            del self._queues[client]
        else:
            self._queues.move_to_end(client)  # its next job waits for the others' turn
        return job

    def _take_batch(self) -> list[Job]:
        """One job per client in turn, same key as the first, up to the token budget."""
        now = time.monotonic()
        batch: list[Job] = []
        tokens = 0
        key = None
        progressed = True
        while progressed:
            progressed = False
            for client in list(self._queues):
                head = self._queues[client][0]
                if head.future.done() or head.deadline <= now:
                    # Cancelled or past its deadline: never forwarded. submit() has
                    # already answered (or will answer) the caller with 504.
                    self._pop(client)
                    progressed = True
                    continue
                if key is not None and head.key != key:
                    continue
                if batch and (not self.enabled or tokens + head.tokens > self.max_batch_tokens):
                    return batch
                key = head.key
                batch.append(self._pop(client))
                tokens += head.tokens
                progressed = True
                if not self.enabled:
                    return batch
        return batch

    async def _run(self, batch: list[Job]) -> None:
        # Sort every item of the batch by length, so each chunk pads little.
        entries = sorted(
            ((job, i, item) for job in batch for i, item in enumerate(job.items)),
            key=lambda entry: entry[2].num_tokens,
        )
        results: dict[int, list[Any]] = {id(job): [None] * len(job.items) for job in batch}
        failed: dict[int, BaseException] = {}
        for chunk in self._chunks(entries):
            items = [item for _, _, item in chunk]
            start = time.perf_counter()
            try:
                outputs = await asyncio.to_thread(batch[0].run, items)
            except Exception as exc:  # a backend failure fails the jobs it touched, not the loop
                log.exception("teacher forward failed")
                for job, _, _ in chunk:
                    failed[id(job)] = exc
                continue
            if self.on_batch is not None:
                longest = max(item.num_tokens for item in items)
                self.on_batch(
                    BatchRecord(
                        key=batch[0].key,
                        items=len(items),
                        tokens=sum(item.num_tokens for item in items),
                        padded_tokens=longest * len(items),
                        seconds=time.perf_counter() - start,
                    )
                )
            for (job, i, _), output in zip(chunk, outputs, strict=True):
                results[id(job)][i] = output
        for job in batch:
            if job.future.done():
                continue
            if id(job) in failed:
                job.future.set_exception(failed[id(job)])
            else:
                job.future.set_result(results[id(job)])

    def _chunks(self, entries: list[tuple[Job, int, Any]]) -> list[list[tuple[Job, int, Any]]]:
        """Consecutive runs whose padded size (count x longest) fits the token budget."""
        chunks: list[list[tuple[Job, int, Any]]] = []
        current: list[tuple[Job, int, Any]] = []
        for entry in entries:
            longest = entry[2].num_tokens  # sorted: the newest entry is the longest
            if current and longest * (len(current) + 1) > self.max_batch_tokens:
                chunks.append(current)
                current = []
            current.append(entry)
        if current:
            chunks.append(current)
        return chunks
