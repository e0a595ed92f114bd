"""storage.batching.Batcher: when calls come fast, a batch waits for
company, up to its linger, and goes at once when enough callers are
waiting; calls that come slowly are written at once."""

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
    # A fast stream of calls: lingering for company pays from now on.
    assert await asyncio.gather(*(batcher.submit(0) for _ in range(40))) == [0] * 40
    recorder.batches.clear()
    calls = [asyncio.ensure_future(batcher.submit(1))]
    await asyncio.sleep(0.05)  # well inside the linger
    calls += [asyncio.ensure_future(batcher.submit(i)) for i in late]
    answers = await asyncio.wait_for(asyncio.gather(*calls), timeout=10)
    assert answers == [10 * i for i in (1, *late)]
    return recorder


def test_enough_callers_do_not_wait_out_the_linger():
    # With a minute's linger, only the early flush answers in time.
    recorder = asyncio.run(_late_company(60.0, 3, [2, 3]))
    assert recorder.batches == [[1, 2, 3]]


def test_fewer_callers_share_a_batch_after_the_linger():
    recorder = asyncio.run(_late_company(0.2, 16, [2]))
    assert recorder.batches == [[1, 2]]


def test_a_lone_call_is_written_at_once():
    recorder = Recorder()
    batcher = Batcher(recorder.write, linger=0.5, enough=16)
    # Well under the linger: it fails if the call waited for company.
    assert asyncio.run(asyncio.wait_for(batcher.submit(7), timeout=0.4)) == 70


def test_calls_a_second_apart_do_not_linger():
    """Light load: waiting for company that is not coming would only
    delay each caller (a task's /check answer) by the whole linger."""
    async def calls() -> None:
        batcher = Batcher(Recorder().write, linger=0.5, enough=16)
        for i in range(3):
            # Well under the linger: it fails if the call waited for company.
            assert await asyncio.wait_for(batcher.submit(i), timeout=0.4) == 10 * i
            await asyncio.sleep(1.0)

    asyncio.run(calls())
