"""Workers tell the API process of every task end they record, one JSON
line per end through a pipe per worker, so that /check can answer ended
tasks without the database (``live.answers``); and, as a JSON object, how
many more tasks they have room for (runtime.handoff).

Best effort by design: the database stays the record, and a lost line
only costs one read. A line is written whole or not at all: a pipe takes
writes of up to ``PIPE_BUF`` bytes atomically, a longer answer (a very
long URL) is not sent, and neither is one that finds the pipe full.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
from collections.abc import Callable
from typing import Any

log = logging.getLogger("md5light.pool")

ENV = "MD5LIGHT_RESULTS_FD"
LINE_MAX = select.PIPE_BUF

OnResult = Callable[[str, int, dict[str, Any]], None]
# {"name": the worker's name, "free": slots free, "seen": tasks handed
# over that it has read so far}
OnRoom = Callable[[dict[str, Any]], None]
# The worker's side: (name, free, seen).
Room = Callable[[str, int, int], None]


class ResultsPipe:
    """The worker's end."""

    def __init__(self, fd: int):
        self.fd = fd
        os.set_blocking(fd, False)

    @classmethod
    def from_environ(cls) -> ResultsPipe | None:
        fd = os.environ.get(ENV)
        return cls(int(fd)) if fd else None

    def send(self, task_id: str, status: int, body: dict[str, Any]) -> None:
        self._line([task_id, status, body])

    def room(self, name: str, free: int, seen: int) -> None:
        self._line({"name": name, "free": free, "seen": seen})

    def _line(self, message: Any) -> None:
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        if len(line) > LINE_MAX:
            return
        try:
            os.write(self.fd, line)
        except (BlockingIOError, BrokenPipeError):
            pass  # /check reads the database for this one


class ResultsReader:
    """The API's end of one worker's pipe, read on the IOLoop."""

    def __init__(self, fd: int, on_result: OnResult, on_room: OnRoom | None = None):
        self.fd = fd
        self.on_result = on_result
        self.on_room = on_room
        self._partial = b""
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self.close()  # the worker is gone; its successor has a new pipe
            return
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
                if isinstance(message, dict):
                    if self.on_room is not None:
                        self.on_room(message)
                    continue
                task_id, status, body = message
            except (ValueError, TypeError):
                log.warning("a worker sent an unreadable result line")
                continue
            self.on_result(task_id, status, body)

    def close(self) -> None:
        if self.fd < 0:
            return
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)
        self.fd = -1
