"""What the API shows of a manifest: totals and per-line results as JSON,
or the lines ``sha256sum -c`` prints."""

from __future__ import annotations

from typing import Any

from service.model.manifest import Manifest, outcome
from service.model.task import Status, Task
from service.model.views import iso

# sha256sum -c's words for a line, by outcome; PENDING is ours (the tool
# never shows a file it has not read yet).
_CHECK_WORDS = {"ok": "OK", "mismatch": "FAILED", "failed": "FAILED open or read",
                "queued": "PENDING", "running": "PENDING"}


def manifest_view(manifest: Manifest, totals: dict[str, int], page: list[Task],
                  next_after: int | None, limit: int) -> dict[str, Any]:
    note = manifest.notification
    return {
        "id": manifest.id, "status": "done" if manifest.finished else "running",
        "lines": manifest.lines, "totals": totals,
        "created_at": iso(manifest.created_at), "finished_at": iso(manifest.finished_at),
        "notification": {"status": str(note.status), "attempts": note.attempts,
                         "error": note.error, "sent_at": iso(note.sent_at)},
        "results": [line_view(task) for task in page],
        "next": (f"/manifests/{manifest.id}?after={next_after}&limit={limit}"
                 if next_after is not None else None),
    }


def line_view(task: Task) -> dict[str, Any]:
    failed = task.status == Status.FAILED and task.error is not None
    return {"line": task.line, "url": task.url, "task": task.id,
            "outcome": outcome(str(task.status), task.verified),
            "expected": str(task.expected) if task.expected else None,
            "digests": task.digests,
            "error": task.error.message if failed and task.error else None}


def check_lines(tasks: list[Task]) -> list[str]:
    """``URL: OK`` and the like, one per line, in order."""
    return [f"{task.url}: {_CHECK_WORDS.get(outcome(str(task.status), task.verified), 'FAILED')}"
            for task in tasks]


def check_warnings(totals: dict[str, int]) -> list[str]:
    """sha256sum -c's closing warnings, in its order."""
    lines = []
    unread, mismatched = totals.get("failed", 0), totals.get("mismatch", 0)
    if unread:
        lines.append(f"WARNING: {unread} listed file{'s' if unread > 1 else ''} "
                     "could not be read")
    if mismatched:
        lines.append(f"WARNING: {mismatched} computed checksum{'s' if mismatched > 1 else ''} "
                     "did NOT match")
    return lines
