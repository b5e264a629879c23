"""Deadlines in the micro-batcher: expired jobs leave the queue and are never forwarded.

A real MicroBatcher forwards to a real tiny model (TransformersBackend on CPU).
Where a test needs the worker busy for a known while, the backend call waits on
a gate first; timings are calibrated on the backend itself, not fixed.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.teacher.backends.base import ScoreItem
from services.teacher.backends.hf import TransformersBackend
from services.teacher.batcher import DeadlineExceeded, Job, MicroBatcher, QueueFull


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> TransformersBackend:
    return TransformersBackend(str(tiny_model_dir), device="cpu")


def item(length: int, offset: int = 0) -> ScoreItem:
    """A sequence of ``length`` token ids, its last token scored."""
    return ScoreItem([5 + (offset + i) % 600 for i in range(length)], [(length - 1, length)])


class Recorder:
    """The backend call for jobs, remembering every item it forwarded (by identity)."""

    def __init__(self, backend: TransformersBackend, gate: threading.Event | None = None) -> None:
        self.backend = backend
        self.gate = gate  # when set: each forward waits for it first
        self.started = threading.Event()
        self.forwarded: set[int] = set()
        self.seconds: list[float] = []  # each forward's duration

    def __call__(self, chunk: list[Any]) -> list[Any]:
        self.started.set()
        if self.gate is not None and not self.gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        self.forwarded.update(id(x) for x in chunk)
        start = time.perf_counter()
        scores = self.backend.score(chunk, 0)
        self.seconds.append(time.perf_counter() - start)
        return scores

    def typical_s(self) -> float:
        """The median duration of the last few forwards."""
        return statistics.median(self.seconds[-9:])


def job(
    items: list[ScoreItem], run: Callable[[list[Any]], list[Any]], client: str, deadline_s: float
) -> Job:
    return Job(
        key=("tiny", "score", 0),
        items=items,
        run=run,
        client_id=client,
        deadline=time.monotonic() + deadline_s,
    )


async def wait_until(flag: threading.Event, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not flag.is_set():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.001)


async def test_a_queue_full_of_expired_jobs_admits_a_new_one(backend: TransformersBackend) -> None:
    batcher = MicroBatcher(max_batch_tokens=64, max_wait_s=0.0, max_queue=4)
    batcher.start()
    gate = threading.Event()
    slow = Recorder(backend, gate)
    try:
        # The worker is busy with a forward (held at the gate) while the queue fills.
        busy = asyncio.create_task(batcher.submit(job([item(64)], slow, "busy", 30.0)))
        await wait_until(slow.started)
        stale = [job([item(32, k)], slow, f"stale-{k}", 0.05) for k in range(4)]
        answers = await asyncio.gather(*(batcher.submit(j) for j in stale), return_exceptions=True)
        assert all(isinstance(a, DeadlineExceeded) for a in answers), answers
        # Four expired jobs hold no place: a new job is admitted and served.
        fresh = job([item(40)], slow, "fresh", 30.0)
        pending = asyncio.create_task(batcher.submit(fresh))
        await asyncio.sleep(0.01)
        assert not pending.done(), pending  # waiting for the busy worker, not refused
        assert batcher.depth == 1
        gate.set()
        [scores] = await asyncio.wait_for(pending, 30)
        await asyncio.wait_for(busy, 30)
    finally:
        gate.set()
        await batcher.stop()
    assert scores == backend.score([item(40)], 0)[0]
    assert not any(id(x) in slow.forwarded for j in stale for x in j.items)


async def test_a_job_whose_deadline_passed_is_not_forwarded_in_a_later_chunk(
    backend: TransformersBackend,
) -> None:
    # One batch of two jobs, cut into two chunks: A's two short items, then B's long one.
    batcher = MicroBatcher(max_batch_tokens=100, max_wait_s=0.2, max_queue=16)
    batcher.start()
    gate = threading.Event()
    run = Recorder(backend, gate)
    a = job([item(10), item(20)], run, "a", 30.0)
    b = job([item(60)], run, "b", 0.5)
    try:
        answers = [asyncio.create_task(batcher.submit(x)) for x in (a, b)]
        await wait_until(run.started)
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(answers[1], 30)  # B's deadline passes during A's chunk
        gate.set()
        a_scores = await asyncio.wait_for(answers[0], 30)
    finally:
        gate.set()
        await batcher.stop()
    assert len(a_scores) == 2
    assert id(b.items[0]) not in run.forwarded


async def test_under_overload_no_forwarded_work_is_thrown_away(
    backend: TransformersBackend,
) -> None:
    """Many clients, a queue of 16, deadlines far shorter than the queue's wait.

    Every job the model forwards must still be answered: forwarding a job whose
    answer then comes back 504 is work thrown away.
    """
    length = 1024
    batcher = MicroBatcher(max_batch_tokens=length, max_wait_s=0.0, max_queue=16)
    batcher.start()
    run = Recorder(backend)
    for k in range(5):  # warm up, and a first measure of a forward
        run([item(length, k)])
    jobs: list[Job] = []
    outcomes: dict[int, str] = {}
    stop_at = time.monotonic() + 3.0

    async def client(name: str) -> None:
        k = 0
        while time.monotonic() < stop_at:
            # Deadlines of eight forwards (as long as they take now, on a shared machine),
            # while a full queue waits about sixteen.
            forward_s = run.typical_s()
            j = job([item(length, k)], run, name, 8 * forward_s)
            jobs.append(j)
            k += 1
            try:
                await batcher.submit(j)
                outcomes[id(j)] = "served"
            except QueueFull:
                outcomes[id(j)] = "refused"
                await asyncio.sleep(forward_s / 2)
            except DeadlineExceeded:
                outcomes[id(j)] = "expired"
                await asyncio.sleep(forward_s / 2)

    try:
        await asyncio.gather(*(client(f"client-{i}") for i in range(24)))
    finally:
        await batcher.stop()
    forwarded = [j for j in jobs if id(j.items[0]) in run.forwarded]
    wasted = [j for j in forwarded if outcomes[id(j)] == "expired"]
    served = sum(outcome == "served" for outcome in outcomes.values())
    expired = sum(outcome == "expired" for outcome in outcomes.values())
    assert served >= 5 and expired > 0  # overloaded, and still serving
    assert len(wasted) <= 0.05 * len(forwarded) + 1, (
        f"{len(wasted)} of {len(forwarded)} forwarded jobs were answered 504"
    )
