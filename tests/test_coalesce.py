"""The Coalescer: single calls side by side become batch calls, each caller gets its own answer."""

from __future__ import annotations

import asyncio

import pytest

from client.coalesce import Coalescer


class Service:
    """A batch call that records each batch and answers item * 10 (or an item's own error)."""

    def __init__(self, hold: asyncio.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.hold = hold
        self.fail_next = False

    async def send(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        if self.hold is not None:
            await self.hold.wait()
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("the whole call failed")
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]


def key(item: int) -> int:
    return abs(item)


async def test_calls_made_together_go_out_as_one_batch() -> None:
    service = Service()
    coalescer = Coalescer(service.send, key)
    answers = await asyncio.gather(*(coalescer(i) for i in range(1, 6)))
    assert answers == [10, 20, 30, 40, 50]
    assert service.batches == [[1, 2, 3, 4, 5]]


async def test_calls_made_while_a_batch_is_out_wait_and_go_in_the_next() -> None:
    hold = asyncio.Event()
    service = Service(hold)
    coalescer = Coalescer(service.send, key)
    first = asyncio.ensure_future(coalescer(1))
    await asyncio.sleep(0.01)  # the first batch is out, held by the service
    later = [asyncio.ensure_future(coalescer(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0.01)
    assert service.batches == [[1]]
    hold.set()
    assert await asyncio.gather(first, *later) == [10, 20, 30, 40]
    assert service.batches == [[1], [2, 3, 4]]


async def test_a_key_appears_once_per_batch_and_batches_keep_call_order() -> None:
    service = Service()
    coalescer = Coalescer(service.send, key, max_batch=3)
    answers = await asyncio.gather(*(coalescer(i) for i in (1, 2, 1, 3, 4, 5)))
    assert answers == [10, 20, 10, 30, 40, 50]
    # The second 1 cannot share the first batch; the first batch is full after 3.
    assert service.batches == [[1, 2, 3], [1, 4, 5]]


async def test_an_items_error_reaches_only_its_caller() -> None:
    coalescer = Coalescer(Service().send, key)
    answers = await asyncio.gather(
        coalescer(1), coalescer(-2), coalescer(3), return_exceptions=True
    )
    assert answers[0] == 10 and answers[2] == 30
    assert isinstance(answers[1], ValueError) and str(answers[1]) == "bad -2"


async def test_a_failed_batch_call_reaches_its_callers_and_the_next_batch_works() -> None:
    service = Service()
    coalescer = Coalescer(service.send, key)
    service.fail_next = True
    failed = await asyncio.gather(coalescer(1), coalescer(2), return_exceptions=True)
    assert all(isinstance(answer, ConnectionError) for answer in failed)
    assert await coalescer(3) == 30


async def test_a_cancelled_caller_leaves_the_others_their_answers() -> None:
    hold = asyncio.Event()
    coalescer = Coalescer(Service(hold).send, key)
    calls = [asyncio.ensure_future(coalescer(i)) for i in (1, 2, 3)]
    await asyncio.sleep(0.01)
    calls[1].cancel()
    hold.set()
    assert await calls[0] == 10 and await calls[2] == 30
    with pytest.raises(asyncio.CancelledError):
        await calls[1]
