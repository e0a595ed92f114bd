"""The watchdog rule every kind of download shares: a download that moves
less than MIN_SPEED in IDLE_TIMEOUT has stalled (Tornado's request_timeout
and ftplib's socket timeout bound the wrong things for big files)."""

from __future__ import annotations

import asyncio
import time

from service.config import Config
from service.fetch.errors import FetchError

Mark = tuple[float, int]


def check(config: Config, host: str, mark: Mark, bytes_done: int,
          last_progress: float) -> tuple[Mark, FetchError | None]:
    """The new mark (when and at how many bytes progress was last enough),
    and the error to abort with once the download has stalled."""
    now = time.monotonic()
    since, at_bytes = mark
    if bytes_done - at_bytes >= config.min_speed:
        return (now, bytes_done), None
    if now - since < config.idle_timeout:
        return mark, None
    seconds = f"{config.idle_timeout:g} s"
    if now - last_progress >= config.idle_timeout:
        message = f"no data from {host} for {seconds}"
    else:
        message = f"download from {host} stalled: {bytes_done - at_bytes} bytes in {seconds}"
    return mark, FetchError("timeout", message, transient=True)


def give_up(gave_up: asyncio.Future) -> None:
    """Stop waiting for an aborted fetch that did not wind down. Bound to
    that fetch's own future: a start over within the grace begins another,
    which this must not cut short."""
    if not gave_up.done():
        gave_up.set_result(None)
