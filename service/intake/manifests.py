"""What POST /manifests does, apart from speaking HTTP: read every line,
admit them together under the quotas, store the manifest and its tasks,
wake the workers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from service.fetch.netpolicy import AddressPolicy
from service.intake.admission import Admission
from service.intake.manifest_parser import SLICE, parse
from service.intake.validation import check_digests, check_email
from service.model.manifest import Manifest
from service.model.task import Task
from service.storage.store import Store


class ManifestIntake:
    def __init__(self, store: Store, admission: Admission, policy: AddressPolicy,
                 mail_enabled: bool, wake: Callable[[], None]):
        self.store = store
        self.admission = admission
        self.policy = policy
        self.mail_enabled = mail_enabled
        self.wake = wake

    async def submit(self, body: bytes, json_body: bool, algorithm: str | None,
                     email: str | None, algorithms: list[str], client: str,
                     owner: str | None = None) -> Manifest:
        """Raises ManifestInvalid, InvalidInput, QuotaExceeded or QueueFull
        to refuse the manifest, or the database's error."""
        lines = await parse(body, json_body, algorithm, self.policy)
        extra, _ = check_digests(algorithms, None)
        manifest = Manifest.new(len(lines), lines[-1].number, check_email(email),
                                self.mail_enabled, client)
        tasks = []
        for i, line in enumerate(lines):
            if i and i % SLICE == 0:
                await asyncio.sleep(0)  # 10,000 tasks are made in slices too
            wanted, _ = check_digests(extra + [line.expected.algorithm], None)
            task = Task.new(line.url, None, False, client=client, algorithms=wanted,
                            expected=line.expected, owner=owner)
            task.manifest, task.line = manifest.id, line.number
            tasks.append(task)
        verdict = await self.admission.admit(client, len(tasks))
        for task in tasks:
            task.lane = verdict.lane
        try:
            await self.store.manifests.create(manifest, tasks)
        except BaseException:
            self.admission.release(client, len(tasks))
            raise
        self.wake()
        return manifest

