"""How a stored task reaches a worker: the seam between intake and the
runtime. Intake asks before storing a task whether a worker can take it
at once (``reserve``), and tells afterwards what became of it; the 'all'
role's pool answers (runtime.handoff), any other API process just wakes
the workers, which find the task by their claim scan."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from service.model.task import Task


class Reservation(Protocol):
    def deliver(self) -> None:
        """The task was stored as assigned: hand it to its worker."""

    def cancel(self) -> None:
        """The task was not stored (refused, or an idempotent retry)."""


class Dispatch(Protocol):
    def reserve(self, task: Task) -> Reservation | None:
        """A worker that can start ``task`` now, which is then made out to
        it (``Task.assign``) and must be stored so; None: store it queued."""

    def queued(self, task: Task) -> None:
        """``task`` was stored queued and runnable."""

    def wake(self) -> None:
        """Something runnable was stored that only a claim scan finds."""


class WakeOnly:
    """No handoff: every runnable task is found by a claim scan."""

    def __init__(self, wake: Callable[[], None]):
        self.wake = wake

    def reserve(self, task: Task) -> Reservation | None:
        return None

    def queued(self, task: Task) -> None:
        self.wake()
