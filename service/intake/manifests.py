"""What POST /manifests does, apart from speaking HTTP: read every line,
admit them together under the quotas, store the manifest and its tasks,
wake the workers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from service.fetch.netpolicy import AddressPolicy
from service.intake.admission import Admission
from service.intake.ena import EnaLine, EnaReports, check_accession
from service.intake.manifest_parser import SLICE, parse
from service.intake.validation import InvalidInput, check_digests, check_email
from service.model.digests import Checksum
from service.model.manifest import Manifest
from service.model.task import Status, Task, TaskError
from service.storage.store import Store


class ManifestIntake:
    def __init__(self, store: Store, admission: Admission, policy: AddressPolicy,
                 mail_enabled: bool, wake: Callable[[], None], ena: EnaReports | None = None):
        self.store = store
        self.admission = admission
        self.policy = policy
        self.mail_enabled = mail_enabled
        self.wake = wake
        self.ena = ena

    async def submit(self, body: bytes, json_body: bool, algorithm: str | None,
                     email: str | None, algorithms: list[str], client: str,
                     owner: str | None = None) -> Manifest:
        """Raises ManifestInvalid, InvalidInput, QuotaExceeded or QueueFull
        to refuse the manifest, or the database's error."""
        lines = await parse(body, json_body, algorithm, self.policy)
        return await self._store([(ln.number, ln.url, ln.expected, None) for ln in lines],
                                 email, algorithms, client, owner)

    async def ena_lines(self, accession: str) -> list[EnaLine]:
        """The files of an ENA accession, each with ENA's MD5 (intake.ena).
        Raises InvalidInput or EnaError."""
        if self.ena is None:
            raise InvalidInput("ena is not available on this service")
        return await self.ena.lines(check_accession(accession))

    async def submit_ena(self, lines: list[EnaLine], email: str | None, algorithms: list[str],
                         client: str, owner: str | None = None) -> Manifest:
        """A manifest of ENA's files; raises QuotaExceeded or QueueFull."""
        return await self._store([(ln.number, ln.url, ln.expected, ln.error) for ln in lines],
                                 email, algorithms, client, owner)

    async def _store(self, lines: list[tuple[int, str, Checksum | None, str | None]],
                     email: str | None, algorithms: list[str], client: str,
                     owner: str | None) -> Manifest:
        extra, _ = check_digests(algorithms, None)
        manifest = Manifest.new(len(lines), lines[-1][0], check_email(email),
                                self.mail_enabled, client)
        tasks, failed = [], 0
        for i, (number, url, expected, error) in enumerate(lines):
            if i and i % SLICE == 0:
                await asyncio.sleep(0)  # 10,000 tasks are made in slices too
            wanted, _ = check_digests(extra + ([expected.algorithm] if expected else []), None)
            task = Task.new(url, None, False, client=client, algorithms=wanted,
                            expected=expected, owner=owner)
            task.manifest, task.line = manifest.id, number
            if error is not None:
                # A line that cannot be checked ends failed at once, and
                # is counted as ended (so the last real line finishes it).
                task.status, task.error = Status.FAILED, TaskError("unverifiable", error)
                task.finished_at, task.lease_until = task.created_at, None
                failed += 1
            tasks.append(task)
        if failed:
            manifest.counts = {"failed": failed}
        verdict = await self.admission.admit(client, len(tasks) - failed)
        for task in tasks:
            task.lane = verdict.lane
        try:
            await self.store.manifests.create(manifest, tasks)
        except BaseException:
            self.admission.release(client, len(tasks) - failed)
            raise
        if failed == len(tasks):
            await self.store.manifests.try_finish(manifest.id)
        self.wake()
        return manifest
