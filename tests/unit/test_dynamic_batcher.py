"""imgcls_core.serving.DynamicBatcher: batches are whatever is queued when the model becomes free."""

from __future__ import annotations

import asyncio

import pytest

from imgcls_core.serving import DynamicBatcher


class Model:
    """A batch function that records its batches and runs until released (or at once)."""

    def __init__(self, hold: bool = False):
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.running = 0
        self.most_running = 0

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        await self.release.wait()
        self.running -= 1
        if any(i < 0 for i in items):
            raise ValueError("negative input")
        return [i * 10 for i in items]


async def settle() -> None:
    """Let every ready task run (submitting, then starting a batch, takes a few loop turns)."""
    for _ in range(5):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(coro)


def test_light_load_runs_each_item_at_once_alone():
    async def main():
        model = Model()
        batcher = DynamicBatcher(model, max_batch_size=8)
        return [await batcher.submit(i) for i in range(3)], model.batches

    results, batches = run(main())
    assert results == [0, 10, 20]
    assert batches == [[0], [1], [2]]  # nothing waited for company


def test_items_queued_while_the_model_is_busy_form_the_next_batch_up_to_the_cap():
    async def main():
        model = Model(hold=True)
        batcher = DynamicBatcher(model, max_batch_size=4)
        first = asyncio.ensure_future(batcher.submit(0))
        await settle()
        assert model.batches == [[0]]
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 11)]
        await settle()
        assert batcher.queued == 10 and len(model.batches) == 1  # one forward slot, busy
        model.release.set()
        return await first, await asyncio.gather(*rest), model.batches

    first, rest, batches = run(main())
    assert first == 0 and rest == [i * 10 for i in range(1, 11)]
    assert batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]


def test_a_failing_batch_fails_its_items_only():
    async def main():
        model = Model(hold=True)
        batcher = DynamicBatcher(model, max_batch_size=8)
        first = asyncio.ensure_future(batcher.submit(1))
        await settle()
        bad = [asyncio.ensure_future(batcher.submit(i)) for i in (2, -1)]
        await settle()
        model.release.set()
        outcome = await asyncio.gather(first, *bad, return_exceptions=True)
        return outcome, await batcher.submit(3)

    (first, two, minus), after = run(main())
    assert first == 10
    assert isinstance(two, ValueError) and isinstance(minus, ValueError)
    assert after == 30  # the batcher keeps working


def test_a_cancelled_request_is_left_out_of_the_next_batch():
    async def main():
        model = Model(hold=True)
        batcher = DynamicBatcher(model, max_batch_size=8)
        first = asyncio.ensure_future(batcher.submit(0))
        await settle()
        gone = asyncio.ensure_future(batcher.submit(1))
        kept = asyncio.ensure_future(batcher.submit(2))
        await settle()
        gone.cancel()  # e.g. its client went away or it timed out
        model.release.set()
        return await first, await kept, model.batches

    first, kept, batches = run(main())
    assert (first, kept) == (0, 20)
    assert batches == [[0], [2]]


def test_concurrent_batches_and_bad_settings():
    async def main():
        model = Model(hold=True)
        batcher = DynamicBatcher(model, max_batch_size=2, max_concurrent_batches=2)
        tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(5)]
        await settle()
        model.release.set()
        return await asyncio.gather(*tasks), model.most_running

    results, most = run(main())
    assert results == [0, 10, 20, 30, 40] and most == 2
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(Model(), max_batch_size=0)


def test_the_images_of_one_request_go_in_one_batch():
    async def main():
        model = Model()
        batcher = DynamicBatcher(model, max_batch_size=16)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(8)))  # as serve/app.py submits
        return results, model.batches

    results, batches = run(main())
    assert results == [i * 10 for i in range(8)] and batches == [list(range(8))]
