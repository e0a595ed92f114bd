"""storage.batching.Batcher: while busy a batch waits for company, up to
its linger, and goes at once when enough callers are waiting."""

import asyncio

from service.storage.batching import Batcher


class Recorder:
    def __init__(self):
        self.batches: list[list[int]] = []

    async def write(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        return [item * 10 for item in items]


async def _busy(batcher: Batcher) -> None:
    """A first call goes at once and makes the batcher busy."""
    assert await batcher.submit(0) == 0


def test_enough_callers_do_not_wait_out_the_linger():
    asyncio.run(_enough())


async def _enough():
    recorder = Recorder()
    batcher = Batcher(recorder.write, linger=60.0, enough=3)
    await _busy(batcher)
    calls = [asyncio.ensure_future(batcher.submit(1))]
    await asyncio.sleep(0.05)  # the batch is lingering now, with one caller
    calls += [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
    # With a minute's linger, only the early flush answers within the timeout.
    answers = await asyncio.wait_for(asyncio.gather(*calls), timeout=10)
    assert answers == [10, 20, 30]
    assert recorder.batches == [[0], [1, 2, 3]]


def test_fewer_callers_share_a_batch_after_the_linger():
    asyncio.run(_fewer())


async def _fewer():
    recorder = Recorder()
    batcher = Batcher(recorder.write, linger=0.2, enough=16)
    await _busy(batcher)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.05)  # well inside the linger
    second = asyncio.ensure_future(batcher.submit(2))
    assert await asyncio.gather(first, second) == [10, 20]
    assert recorder.batches == [[0], [1, 2]]


def test_a_lone_call_is_written_at_once():
    asyncio.run(_lone())


async def _lone():
    recorder = Recorder()
    batcher = Batcher(recorder.write, linger=60.0, enough=16)
    assert await asyncio.wait_for(batcher.submit(7), timeout=10) == 70
