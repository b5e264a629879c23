"""Micro-batching: requests from many clients gathered into few forwards, fairly.

Jobs wait in one queue per client. A batch is formed by taking one job per
client in turn (round robin), all of the same model and kind, until the batch
holds ``max_batch_tokens`` or nothing more is waiting. Before a batch is taken
the oldest waiting job may wait up to ``max_wait_s`` for company; a job that
already waited that long (it arrived during the previous forward) is taken at
once. The batch's items are sorted by length and cut into chunks of at most
``max_batch_tokens`` padded tokens, and each chunk is forwarded in a worker
thread so the event loop keeps accepting requests.

The queue is bounded (``QueueFull`` -> 503) and counts only live jobs. Every
job has a deadline (``DeadlineExceeded`` -> 504): when it passes, the job is
answered and leaves the queue at once, and it is never forwarded afterwards. A
job whose deadline would pass before the forward it is about to join ends (by
the recent forwards' duration) is answered 504 at once instead of being
forwarded for nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
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
    queued_at: float = 0.0  # time.monotonic() when submitted

    @cached_property
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


Entry = tuple[Job, int, Any]  # a job, the index of one of its items, the item


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
        self._waiting = 0  # live jobs in the queues
        self._tokens = 0  # their tokens
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        # Per batch key, the seconds per padded token of its last few forwards and their
        # median: how long the next forward will take, to tell which jobs it can still
        # answer in time.
        self._recent: dict[tuple[Any, ...], deque[float]] = {}
        self._pace: dict[tuple[Any, ...], float] = {}

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
        self._waiting = self._tokens = 0

    async def submit(self, job: Job) -> list[Any]:
        """Queue ``job`` and wait for its results (in item order)."""
        now = time.monotonic()
        if self._waiting >= self.max_queue:
            self._drop_expired(now)
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} jobs are waiting")
        if job.deadline <= now:
            raise DeadlineExceeded("the request's deadline passed")
        job.queued_at = now
        self._queues.setdefault(job.client_id, deque()).append(job)
        self._waiting += 1
        self._tokens += job.tokens
        if self._waiting == 1 or self._tokens >= self.max_batch_tokens:
            self._wakeup.set()  # the worker waits for a first job or for a full batch
        timer = asyncio.get_running_loop().call_later(job.deadline - now, self._expire, job)
        try:
            return await job.future
        except asyncio.CancelledError:
            self._discard(job)  # the caller left: drop the job if it has not run yet
            raise
        finally:
            timer.cancel()

    # ------------------------------------------------------------------ the queue

    def _expire(self, job: Job) -> None:
        """Answer ``job`` with DeadlineExceeded and take it out of the queue."""
        if not job.future.done():
            job.future.set_exception(DeadlineExceeded("the request's deadline passed"))
        self._discard(job)

    def _discard(self, job: Job) -> None:
        """Take ``job`` out of its client's queue, if it is still waiting there."""
        queue = self._queues.get(job.client_id)
        if queue is None:
            return
        try:
            queue.remove(job)
        except ValueError:
            return  # taken into a batch already
        self._waiting -= 1
        self._tokens -= job.tokens
        if not queue:
            del self._queues[job.client_id]

    def _drop_expired(self, now: float) -> None:
        """Answer and drop every waiting job whose deadline has passed or that was answered."""
        for queue in list(self._queues.values()):
            for job in [j for j in queue if j.deadline <= now or j.future.done()]:
                self._expire(job)

    def _pop(self, client: str) -> Job:
        queue = self._queues[client]
        job = queue.popleft()
        self._waiting -= 1
        self._tokens -= job.tokens
        if not queue:
            del self._queues[client]
        else:
            self._queues.move_to_end(client)  # its next job waits for the others' turn
        return job

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
        """Wait until the oldest waiting job has waited ``max_wait_s`` or a full batch waits."""
        if not self._queues:
            return
        oldest = min(queue[0].queued_at for queue in self._queues.values())
        remaining = oldest + self.max_wait_s - time.monotonic()
        if remaining <= 0 or self._tokens >= self.max_batch_tokens:
            return
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining):
                await self._wakeup.wait()

    def _take_batch(self) -> list[Job]:
        """One job per client in turn, same key as the first, up to the token budget.

        A job that the batch's forward would likely answer too late (``_forward_s``)
        is answered 504 and dropped instead, unless no waiting job could be answered in
        time even when fresh: the estimate may then be stale (or the deadlines too short
        for it), so jobs are forwarded until their deadlines pass, which refreshes it.
        """
        now = time.monotonic()
        strict = any(
            q[0].deadline - q[0].queued_at > self._forward_s(q[0].key, q[0].tokens)
            for q in self._queues.values()
        )
        batch: list[Job] = []
        tokens = 0
        key = None
        progressed = True
        while progressed:
            progressed = False
            for client in list(self._queues):
                head = self._queues[client][0]
                late = head.deadline <= now or (
                    strict
                    and head.deadline <= now + self._forward_s(head.key, tokens + head.tokens)
                )
                if head.future.done() or late:
                    self._expire(head)
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

    def _forward_s(self, key: tuple[Any, ...], tokens: int) -> float:
        """How long a forward of ``tokens`` may take: twice the recent time per token."""
        return 2 * self._pace.get(key, 0.0) * tokens

    async def _run(self, batch: list[Job]) -> None:
        # Sort every item of the batch by length, so each chunk pads little.
        entries = sorted(
            ((job, i, item) for job in batch for i, item in enumerate(job.items)),
            key=lambda entry: entry[2].num_tokens,
        )
        key, run = batch[0].key, batch[0].run
        results: dict[Job, list[Any]] = {job: [None] * len(job.items) for job in batch}
        for chunk in self._chunks(entries):
            # A job answered meanwhile (its deadline passed, its caller left) is not forwarded.
            now = time.monotonic()
            for job, _, _ in chunk:
                if job.deadline <= now:
                    self._expire(job)
            chunk = [entry for entry in chunk if not entry[0].future.done()]
            if not chunk:
                continue
            items = [item for _, _, item in chunk]
            start = time.perf_counter()
            try:
                outputs = await asyncio.to_thread(run, items)
            except Exception as exc:  # a backend failure fails the jobs it touched, not the loop
                log.exception("teacher forward failed")
                for job, _, _ in chunk:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            seconds = time.perf_counter() - start
            padded = items[-1].num_tokens * len(items)  # sorted: the last item is the longest
            self._learn_pace(key, seconds / max(padded, 1))
            if self.on_batch is not None:
                self.on_batch(
                    BatchRecord(
                        key=key,
                        items=len(items),
                        tokens=sum(item.num_tokens for item in items),
                        padded_tokens=padded,
                        seconds=seconds,
                    )
                )
            for (job, i, _), output in zip(chunk, outputs, strict=True):
                results[job][i] = output
        for job, outputs in results.items():
            if not job.future.done():
                job.future.set_result(outputs)

    def _learn_pace(self, key: tuple[Any, ...], seconds_per_token: float) -> None:
        """Note a forward's time per padded token; the pace is the median of the last five."""
        if len(self._recent) >= 64 and key not in self._recent:
            self._recent.clear()  # keys name models: forget those of unloaded ones
            self._pace.clear()
        recent = self._recent.setdefault(key, deque(maxlen=5))
        recent.append(seconds_per_token)
        self._pace[key] = statistics.median(recent)

    def _chunks(self, entries: list[Entry]) -> list[list[Entry]]:
        """Consecutive runs whose padded size (count x longest) fits the token budget."""
        chunks: list[list[Entry]] = []
        current: list[Entry] = []
        for entry in entries:
            longest = entry[2].num_tokens  # sorted: the newest entry is the longest
            if current and longest * (len(current) + 1) > self.max_batch_tokens:
                chunks.append(current)
                current = []
            current.append(entry)
        if current:
            chunks.append(current)
        return chunks
