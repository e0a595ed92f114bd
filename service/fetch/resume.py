"""The resume side of one download attempt: what to ask for, what the
answer means, and which checkpoint a retry should start from.

The rules (docs/design.md, "Checkpoints and resuming"):

- A checkpoint that fits the task is offered with Range and If-Range.
- A 206 whose Content-Range starts at its offset, for the same total,
  under the checkpoint's validator (same strong ETag, or same
  Last-Modified), continues the saved hash states. A 206 with another
  validator or none is another version's bytes (a server that ignores
  If-Range): the attempt starts over, and ``note`` says why.
- A 200 means the file changed (If-Range failed) or ranges are ignored:
  the body is hashed from byte 0 with fresh hashers, in the same request.
- A 416, or a 206 for any other range, cannot be used: the attempt starts
  over with a request without Range.
- A body that turns out corrupted leaves no checkpoint behind: its bytes
  are suspect, so the next attempt starts from 0.
"""

from __future__ import annotations

import enum
from typing import Any

from tornado.httputil import HTTPHeaders

from service.config import Config
from service.fetch import server_claims
from service.fetch.checkpoint import Checkpoint, validator, why_not
from service.fetch.hashing import DigestSink
from service.fetch.server_claims import Claim
from service.model.numbers import whole_number


class Answer(enum.Enum):
    FRESH = "fresh"          # hash this body from byte 0
    CONTINUE = "continue"    # this body continues the checkpoint
    START_OVER = "start_over"  # drop this response; fetch again without Range
    OTHER = "other"          # not an answer to the range (an error status)


class Resumer:
    def __init__(self, config: Config, algorithms: list[str], checkpoint: Checkpoint | None):
        self.config = config
        # What this attempt offers the server, and the newest checkpoint a
        # retry could start from (None: from byte 0).
        self.offered = checkpoint if checkpoint and checkpoint.fits(algorithms) else None
        self.saved = self.offered
        self.resumed_from: int | None = None
        # Why this download is not checkpointed (None: it is, or not known yet).
        self.note: str | None = None
        # Why a checkpoint offered in this attempt was not continued.
        self.started_over: str | None = None
        self._validator: str | None = None
        self._claim: Claim | None = None
        self._total: int | None = None

    def request_headers(self) -> dict[str, str]:
        return self.offered.headers() if self.offered else {}

    def answer(self, status: int, headers: HTTPHeaders) -> Answer:
        offered = self.offered
        if offered is None:
            return Answer.FRESH if 200 <= status < 300 else Answer.OTHER
        if offered.continues(status, headers):
            other = offered.other_version(headers)
            if other is not None:
                return self._start_over(other)
            length = whole_number(headers.get("Content-Length", "").strip())
            if length is not None and length != offered.total - offered.offset:
                return self._start_over(
                    f"the server's answer to the resume announced {length} bytes, not "
                    f"{offered.total - offered.offset}; the download started over from byte 0")
            return Answer.CONTINUE
        if status == 416 or status == 206:
            return self._start_over(
                f"the server answered the resume with {status} "
                f"{headers.get('Content-Range', '')}, not the rest of the file from "
                f"byte {offered.offset}; the download started over from byte 0")
        if 200 <= status < 300:
            # The file changed since the checkpoint, or ranges are not
            # supported: the old states must not be mixed with this body.
            self.offered = self.saved = None
            self.started_over = ("the server sent the whole file to the resume (it changed, "
                                 "or ignores ranges); hashed from byte 0")
            return Answer.FRESH
        return Answer.OTHER

    def forget(self) -> None:
        """Offer no checkpoint from here on: the next request is from byte 0."""
        self.offered = self.saved = None

    def _start_over(self, why: str) -> Answer:
        self.offered = self.saved = None
        self.started_over = why
        return Answer.START_OVER

    def continue_into(self, sink: DigestSink,
                      headers: HTTPHeaders) -> tuple[Claim | None, int]:
        """Restore the checkpoint into a fresh ``sink``. The claim to check
        at the end (a whole-representation one, from this answer or the
        first), and the file's length."""
        offered = self.offered
        assert offered is not None
        sink.make_resumable(offered.states, offered.offset)
        self.resumed_from = offered.offset
        self._validator, self._total = offered.validator, offered.total
        found = [c for c in server_claims.claims(headers, partial=True)
                 if c.checksum.algorithm in offered.states]
        self._claim = server_claims.pick(found, sink.algorithms) or offered.server_claim()
        return self._claim, offered.total

    def begin(self, sink: DigestSink, total: int | None, headers: HTTPHeaders,
              claim: Claim | None, any_size: bool = False) -> None:
        """A body from byte 0: checkpoint it if it is worth it and possible
        (``any_size``: whatever its size, as a segmented download is)."""
        self.note = why_not(sink.algorithms, total, headers,
                            0 if any_size else self.config.resumable_min_size)
        if self.note is None:
            # A multipart claim's part digests are not saved: only a
            # whole-file claim is checked after a resume.
            self._validator, self._total = validator(headers), total
            self._claim = claim if claim is not None and claim.parts is None else None
            sink.make_resumable()

    def corrupted(self) -> None:
        self.saved = None

    def due(self, sink: DigestSink) -> Checkpoint | None:
        """A checkpoint worth writing now: CHECKPOINT_INTERVAL bytes past
        the last one. It becomes the one a retry starts from."""
        done = self.saved.offset if self.saved else 0
        if sink.hashed - done < self.config.checkpoint_interval:
            return None
        return self.latest(sink)

    def latest(self, sink: DigestSink) -> Checkpoint | None:
        """The newest checkpoint: of the bytes hashed so far, or the one
        saved before (None: a retry starts from byte 0)."""
        if sink.resumable and self._validator and self._total \
                and (self.saved is None or sink.hashed > self.saved.offset) \
                and 0 < sink.hashed < self._total:
            claim = self._claim
            self.saved = Checkpoint(
                offset=sink.hashed, states=sink.states(), validator=self._validator,
                total=self._total, claim=claim.checksum if claim else None,
                claim_header=claim.header if claim else None)
        return self.saved

    def progress(self, fetched: int) -> dict[str, Any]:
        """This attempt, as /tasks/<id> shows it."""
        notes = [n for n in (self.started_over, self.note) if n]
        return {"resumed_from": self.resumed_from, "fetched": fetched,
                "note": "; ".join(notes) or None}
