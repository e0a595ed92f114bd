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


async def _late_company(linger: float, enough: int, late: list[int]) -> Recorder:
    """A busy batcher; one call, then, while its batch lingers, ``late``
    more. Every answer must come within ten seconds."""
    recorder = Recorder()
    batcher = Batcher(recorder.write, linger=linger, enough=enough)
    assert await batcher.submit(0) == 0  # goes at once, and makes it busy
    calls = [asyncio.ensure_future(batcher.submit(1))]
    await asyncio.sleep(0.05)  # well inside the linger
    calls += [asyncio.ensure_future(batcher.submit(i)) for i in late]
    answers = await asyncio.wait_for(asyncio.gather(*calls), timeout=10)
    assert answers == [10 * i for i in (1, *late)]
    return recorder


def test_enough_callers_do_not_wait_out_the_linger():
    # With a minute's linger, only the early flush answers in time.
    recorder = asyncio.run(_late_company(60.0, 3, [2, 3]))
    assert recorder.batches == [[0], [1, 2, 3]]


def test_fewer_callers_share_a_batch_after_the_linger():
    recorder = asyncio.run(_late_company(0.2, 16, [2]))
    assert recorder.batches == [[0], [1, 2]]


def test_a_lone_call_is_written_at_once():
    recorder = Recorder()
    batcher = Batcher(recorder.write, linger=60.0, enough=16)
    assert asyncio.run(asyncio.wait_for(batcher.submit(7), timeout=10)) == 70
