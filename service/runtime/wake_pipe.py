"""What the API process writes to each pool worker's wake pipe.

``!`` wakes the worker to scan for work: something runnable was stored
that was not handed to anyone (a manifest's lines, a task no worker had
room for). ``T`` + two bytes of length + a task's document (BSON) hands
the worker that task (runtime.handoff): made out to it already, or queued
for it to claim by id. A message is written whole or not at all: a pipe
takes a write of up to ``PIPE_BUF`` bytes atomically, a task too long for
one is not handed (the scan finds it), and neither is one that finds the
pipe full.
"""

from __future__ import annotations

import os
import select
import struct
from typing import Any

import bson

WAKE = b"!"
TASK = b"T"
_LENGTH = struct.Struct(">H")
MESSAGE_MAX = select.PIPE_BUF
_CODEC: bson.CodecOptions = bson.CodecOptions(tz_aware=True)


def task_message(doc: dict[str, Any]) -> bytes | None:
    body = bson.encode(doc)
    message = TASK + _LENGTH.pack(len(body)) + body
    return message if len(message) <= MESSAGE_MAX else None


def write(fd: int, message: bytes) -> bool:
    """Whether the whole message went in (never part of it)."""
    try:
        return os.write(fd, message) == len(message)
    except (BlockingIOError, BrokenPipeError):
        return False


class WakeReader:
    """The worker's end: bytes in, messages out (None: a wake; a dict: a
    task handed over)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[dict[str, Any] | None]:
        self._buffer += data
        out: list[dict[str, Any] | None] = []
        while self._buffer:
            kind = self._buffer[:1]
            if kind == TASK:
                if len(self._buffer) < 1 + _LENGTH.size:
                    break
                (size,) = _LENGTH.unpack_from(self._buffer, 1)
                end = 1 + _LENGTH.size + size
                if len(self._buffer) < end:
                    break
                out.append(bson.decode(self._buffer[1 + _LENGTH.size:end], _CODEC))
                self._buffer = self._buffer[end:]
            else:  # a wake (any other byte wakes too: older writers sent "!")
                self._buffer = self._buffer[1:]
                out.append(None)
        return out
