"""One retry policy for every retry in md5-light: downloads, database
writes, mail, worker restarts, start-up waits. Like rq's ``Retry``: a value
object that says how long to wait before attempt n."""

from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass(frozen=True)
class Backoff:
    first: float          # the wait after the first failure
    cap: float            # never wait longer than this
    factor: float = 2.0
    # A fraction of each wait drawn at random, so that many clients that
    # failed together do not all retry together.
    jitter: float = 0.0

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` failures in a row (1 = the first)."""
        if failures <= 0:
            return 0.0
        wait = min(self.cap, self.first * self.factor ** (failures - 1))
        if self.jitter:
            wait *= 1 - self.jitter * random.random()
        return wait
