"""What POST /submit does, apart from speaking HTTP: check the input,
admit the task under the quotas, store it (as a follower of a download
already in flight for the same file, see storage.coalescing), wake a
worker."""

from __future__ import annotations

import dataclasses

from service.fetch.netpolicy import AddressPolicy
from service.intake import metalink as metalinks
from service.intake.admission import Admission, Verdict
from service.intake.dispatch import Dispatch
from service.intake.validation import (
    MAX_MIRRORS,
    InvalidInput,
    check_callback_url,
    check_connections,
    check_digests,
    check_email,
    check_idempotency_key,
    check_max_age,
    check_mirrors,
    check_url,
)
from service.model.cached import answer_from
from service.model.task import Task, utcnow
from service.storage.store import Store


@dataclasses.dataclass
class Accepted:
    task_id: str
    # Where the client stands under its quota, this task included.
    standing: Verdict


class Submissions:
    def __init__(self, store: Store, admission: Admission, policy: AddressPolicy,
                 mail_enabled: bool, dispatch: Dispatch, coalesce: bool = True,
                 webhooks: bool = False, max_connections: int = 16):
        self.store = store
        self.max_connections = max_connections
        self.coalesce = coalesce
        # Whether callback_url is taken: only with a secret to sign with.
        self.webhooks = webhooks
        self.admission = admission
        self.policy = policy
        self.mail_enabled = mail_enabled
        self.dispatch = dispatch

    async def submit(self, url: str | None, email: str | None, idempotency_key: str | None,
                     client: str, algorithms: list[str] | None = None,
                     expected: str | None = None,
                     callback_url: str | None = None,
                     max_age: str | None = None, owner: str | None = None,
                     connections: str | None = None, mirrors: list[str] | None = None,
                     metalink: str | None = None) -> Accepted:
        """Raises InvalidInput, IdempotencyConflict, QuotaExceeded or
        QueueFull to refuse the task, or the database's error."""
        size, pieces, from_metalink = None, None, []
        if metalink is not None and metalink.strip():
            if url is not None and url.strip():
                raise InvalidInput("give url or metalink, not both: a Metalink names the "
                                   "file's URLs itself")
            described = metalinks.parse(metalink)
            url, from_metalink = described.urls[0], described.urls[1:]
            size, pieces = described.size, described.pieces
            # The user's own expected checksum wins over the document's.
            if (expected is None or not expected.strip()) and described.expected:
                expected = str(described.expected)
        wanted, checksum = check_digests(algorithms or [], expected)
        url = check_url(url, self.policy)
        others = check_mirrors(list(mirrors or []), url, self.policy)
        # A Metalink may list dozens of mirrors: the best ones are kept.
        candidates = [u for u in from_metalink if _is_http(u)][:MAX_MIRRORS]
        for extra in check_mirrors(candidates, url, self.policy, name="the metalink's mirror"):
            if extra not in others and len(others) < MAX_MIRRORS:
                others.append(extra)
        task = Task.new(url, check_email(email), self.mail_enabled,
                        client=client, owner=owner, algorithms=wanted, expected=checksum,
                        connections=check_connections(connections, self.max_connections),
                        callback_url=check_callback_url(callback_url, self.policy,
                                                        self.webhooks),
                        mirrors=others, size=size, pieces=pieces)
        key = check_idempotency_key(idempotency_key)
        task.max_age = check_max_age(max_age)
        known = (await self.store.known_files.get(task.url, task.algorithms)
                 if task.max_age else None)
        if known is not None and known.age(utcnow()) <= task.max_age:
            # Young enough: answered now, with nothing to run (no quota).
            answer_from(task, known)
            task_id = await self.store.records.create(task, key)
            return Accepted(task_id, self.admission.peek(client))
        verdict: Verdict | None = None

        async def admit() -> int:
            nonlocal verdict
            verdict = await self.admission.admit(client)
            return verdict.lane

        fresh_id = task.id
        # This process's submit of the file, if one leads it already; if
        # not, the task is stored as a leader while other processes'
        # downloads are looked up.
        election = await self.store.coalescer.elect(task) if self.coalesce else None
        leader = election.leader if election is not None else None
        stored_as: str | None = None  # the task that leads the file, once stored
        try:
            if leader is not None:
                task.follow(leader)
            elif known is not None and known.conditional_headers():
                task.revalidate = known  # a 304 then answers from it
            # A worker with room now: the task is stored already claimed by it.
            assigned = self.dispatch.reserve(task) if leader is None else None
            try:
                task_id = await self.store.records.create(task, key, admit)
            except BaseException:
                if assigned is not None:
                    assigned.cancel()
                if verdict is not None:
                    self.admission.release(client)  # admitted, but never stored
                raise
            if task_id != fresh_id:  # an idempotent retry: nothing new was stored
                if assigned is not None:
                    assigned.cancel()
                return Accepted(task_id, self._standing(client, verdict))
            if election is not None and leader is None:
                found = await election.found()
                if found is not None:
                    # Another process's download of the file: follow it,
                    # before any worker hears of this task.
                    if assigned is not None:
                        assigned.cancel()
                        assigned = None
                    if not await self.store.coalescer.demote(task, found):
                        stored_as = task_id  # a worker has it: it leads after all
                        return Accepted(task_id, self._standing(client, verdict))
                    leader = found
            stored_as = leader or task_id
            if election is not None:
                election.stored(stored_as)  # before a join that may find it ended
            if assigned is not None:
                assigned.deliver()
            elif leader is None:
                self.dispatch.queued(task)
            elif not await self.store.coalescer.join(task, leader):
                self.dispatch.wake()  # runnable on its own after all
        finally:
            if election is not None:
                election.stored(stored_as)
        return Accepted(task_id, self._standing(client, verdict))

    def _standing(self, client: str, verdict: Verdict | None) -> Verdict:
        # A new task now holds a place; an idempotent retry takes none.
        return (Verdict(verdict.limit, verdict.pending + 1, verdict.lane)
                if verdict is not None else self.admission.peek(client))


def _is_http(url: str) -> bool:
    return url.strip(" ").lower().startswith(("http://", "https://"))
