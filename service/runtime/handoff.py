"""Fresh tasks handed to the pool's workers by the API process.

A claim costs the database a scan for candidates and a conditional write,
and in a burst of small files the workers scanning one window race for the
same tasks (a loser then reads back which it won): a third of the
database's statements per task (issue #25). The 'all' role's API process
stores every task and owns a pipe to each of its workers, so it hands
tasks over itself:

- **Assigned at insert.** When a worker has room and no task waits here,
  the task is stored already claimed by that worker (``Task.assign``: its
  name, a fresh fencing token, a lease on the database's clock) and its
  document sent to it once the insert is acknowledged. No claim write.
- **Handed while queued.** Otherwise the task is stored queued and waits
  here, lowest lane first and then oldest, until a worker has room; that
  worker claims what it is handed by id, several in one conditional
  ``update_many`` (``queue.take_handed``): no scan, no race.
- **Room.** Each worker reports through its results pipe how many slots
  it has free and how many handed tasks it has read; what was sent since
  is deducted, so a slot is never promised twice.

Nothing depends on this for being done. A waiting task is in the database
as queued, and any worker's claim scan (every POLL_INTERVAL, or at once
when woken with ``!``) takes it, this process gone or not. An assigned
task holds a lease like any claimed one: taken over when it runs out, as
when a worker dies mid-download. A message that cannot be written (pipe
full, worker gone) gives an assigned task back to the queue at once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import logging
import os
import uuid
from typing import Any

from pymongo.errors import PyMongoError

from service.model.task import Task
from service.runtime import wake_pipe
from service.storage.dbclock import DatabaseClock
from service.storage.queue import TaskQueue

log = logging.getLogger("md5light.pool")

# Tasks kept waiting here; past it they are stored queued and the workers
# woken to scan, as before the handoff.
MAX_WAITING = 10_000
# How often the lease clock (the database's) is measured again.
CLOCK_SYNC_SECONDS = 60.0


@dataclasses.dataclass
class _Room:
    """One pool worker as the API sees it."""
    fd: int
    name: str | None = None  # until its first report, nothing is handed to it
    free: int = 0
    seen: int = 0
    sent: int = 0

    @property
    def credit(self) -> int:
        return self.free - (self.sent - self.seen) if self.name else 0


class _Assignment:
    def __init__(self, handoff: Handoff, room: _Room, task: Task):
        self.handoff, self.room, self.task = handoff, room, task

    def deliver(self) -> None:
        message = wake_pipe.task_message(self.task.to_doc())
        if message is not None and wake_pipe.write(self.room.fd, message):
            return
        self.cancel()
        self.handoff.give_back(self.task, self.room.name or "")

    def cancel(self) -> None:
        self.room.sent -= 1


class Handoff:
    def __init__(self, queue: TaskQueue, clock: DatabaseClock, lease_seconds: float,
                 enabled: bool = True, max_waiting: int = MAX_WAITING):
        # Off (HANDOFF=0): every submit only wakes a worker to scan.
        self.enabled = enabled
        self.queue = queue
        self.clock = clock
        self.lease = dt.timedelta(seconds=lease_seconds)
        self.max_waiting = max_waiting
        self._rooms: dict[int, _Room] = {}
        self._waiting: dict[int, collections.deque[bytes]] = {}
        self._count = 0
        self._next_wake = -1
        self._jobs: set[asyncio.Task] = set()
        self._clock_job: asyncio.Task | None = None

    # -- the pool's side --------------------------------------------------

    def attach(self, index: int, fd: int) -> None:
        """Pool slot ``index`` has a (new) worker whose wake pipe is ``fd``."""
        self._rooms[index] = _Room(fd)
        if self._clock_job is None:
            self._clock_job = asyncio.get_running_loop().create_task(self._keep_time())

    def detach(self, index: int) -> None:
        self._rooms.pop(index, None)

    def report(self, index: int, message: dict[str, Any]) -> None:
        """A worker's report of its room (results_pipe.ResultsPipe.room)."""
        room = self._rooms.get(index)
        if room is None:
            return
        try:
            room.name = str(message["name"])
            room.free, room.seen = int(message["free"]), int(message["seen"])
        except (KeyError, TypeError, ValueError):
            log.warning("a worker sent an unreadable room report")
            return
        self._pump()

    def stop(self) -> None:
        self._rooms.clear()
        if self._clock_job is not None:
            self._clock_job.cancel()

    # -- intake's side (intake.dispatch.Dispatch) -------------------------

    def reserve(self, task: Task) -> _Assignment | None:
        if not self.enabled or self._count:
            return None  # tasks wait already: this one must not pass them
        room = self._roomiest()
        if room is None or room.name is None:
            return None
        now = self.clock.now()
        task.assign(room.name, uuid.uuid4().hex, now, now + self.lease)
        if wake_pipe.task_message(task.to_doc()) is None:
            # Too long for one pipe write (a Metalink's piece list, say):
            # stored queued, and a scan finds it.
            task.unassign()
            return None
        room.sent += 1  # on its way: no other submit counts on this slot
        return _Assignment(self, room, task)

    def queued(self, task: Task) -> None:
        message = wake_pipe.task_message(task.to_doc()) if self.enabled else None
        if message is None or self._count >= self.max_waiting:
            self.wake()
            return
        self._waiting.setdefault(task.lane, collections.deque()).append(message)
        self._count += 1
        self._pump()

    def wake(self) -> None:
        """Wake one worker to scan, round-robin: waking all of them would
        have every worker race for the same task."""
        rooms = list(self._rooms.values())
        for _ in range(len(rooms)):
            self._next_wake = (self._next_wake + 1) % len(rooms)
            try:
                os.write(rooms[self._next_wake].fd, wake_pipe.WAKE)
                return
            except BlockingIOError:
                return  # its pipe is full: it is awake
            except BrokenPipeError:
                continue  # gone; the pool starts another

    # -- inside -----------------------------------------------------------

    def _roomiest(self) -> _Room | None:
        best = max(self._rooms.values(), key=lambda room: room.credit, default=None)
        return best if best is not None and best.credit > 0 else None

    def _pump(self) -> None:
        while self._count:
            room = self._roomiest()
            if room is None:
                return
            lane = min(self._waiting)
            message = self._waiting[lane][0]
            if not wake_pipe.write(room.fd, message):
                # Full or gone: nothing more for it until it reports again.
                room.free = room.sent - room.seen
                continue
            room.sent += 1
            self._waiting[lane].popleft()
            if not self._waiting[lane]:
                del self._waiting[lane]
            self._count -= 1

    def give_back(self, task: Task, worker: str) -> None:
        job = asyncio.get_running_loop().create_task(self._give_back(task, worker))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _give_back(self, task: Task, worker: str) -> None:
        try:
            if await self.queue.give_back(task, worker):
                self.wake()
        except PyMongoError:
            log.warning("task %s: could not give back an undelivered assignment; it runs "
                        "when its lease ends", task.id)

    async def _keep_time(self) -> None:
        while True:
            try:
                await self.clock.sync()
            except PyMongoError:
                pass
            await asyncio.sleep(CLOCK_SYNC_SECONDS)
