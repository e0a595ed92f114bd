"""Manifests: verify a whole list of files at once, like sha256sum -c."""

from __future__ import annotations

import urllib.parse

from tornado import httputil, web

from service.intake.admission import RETRY_AFTER_FULL, QueueFull, QuotaExceeded
from service.intake.ena import EnaError
from service.intake.manifest_parser import MAX_TEXT_LINES, ManifestInvalid
from service.intake.manifests import ManifestIntake
from service.intake.validation import InvalidInput
from service.model.ids import could_be_ours
from service.model.manifest import MAX_LINES
from service.model.manifest_views import check_lines, check_warnings, manifest_view
from service.model.numbers import whole_number
from service.model.views import NOT_FOUND
from service.storage.manifests import ManifestRecords

from .base import SUBMIT_PATIENCE, JsonHandler

# 10,000 lines of long URLs; the per-line rules still apply.
MAX_MANIFEST_BODY = 16 * 2**20
PAGE, MAX_PAGE = 100, 1000
# Storing 10,000 tasks is ten inserts of 1,000, each up to a second or two
# on a busy embedded database: far more than a submit's wait.
MANIFEST_PATIENCE = 10 * SUBMIT_PATIENCE


class ManifestsHandler(JsonHandler):
    """POST /manifests: the body is the manifest (text as sha256sum prints
    it, JSON, or a file in a multipart form); options in the query."""

    max_body = MAX_MANIFEST_BODY

    def initialize(self, intake: ManifestIntake) -> None:
        self.intake = intake
        self._lines_seen = 0
        kind = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        # A text body's line limit holds while it arrives (JSON may be
        # pretty-printed, and a form's file is judged once it is parsed).
        self._counts_lines = kind not in ("application/json", "multipart/form-data")

    def data_received(self, chunk: bytes) -> None:
        if self._counts_lines and not self._too_big:
            self._lines_seen += chunk.count(b"\n")
            if self._lines_seen > MAX_TEXT_LINES:
                # The rest is dropped unread, as an oversized body's is.
                self._too_big = True
                self._body = bytearray()
                return
        super().data_received(chunk)

    def _refuse_oversized(self) -> None:
        if self._lines_seen > MAX_TEXT_LINES:
            raise web.HTTPError(400, log_message=(
                f"the manifest has more than {MAX_TEXT_LINES} lines; the limit is "
                f"{MAX_LINES} checksum lines"))
        raise web.HTTPError(413, reason="Payload Too Large")

    async def post(self) -> None:
        caller = await self.caller()
        args = self.arguments_from_query()
        ena = self._ena_form(args)
        body, json_body = self._manifest_body() if ena is None else (b"", False)
        try:
            if ena is not None:
                # ENA's report is asked first, outside the database's patience.
                lines = await self.intake.ena_lines(ena)
                work = self.intake.submit_ena(lines, self.one(args, "email"),
                                              args.get("algorithms", []), caller.client,
                                              caller.key_id)
            else:
                work = self.intake.submit(
                    body, json_body, self.one(args, "algorithm"), self.one(args, "email"),
                    args.get("algorithms", []), caller.client, caller.key_id)
            manifest = await self.db(work, patience=MANIFEST_PATIENCE,
                                     driver=MANIFEST_PATIENCE)
        except EnaError as exc:
            return self.send(502, {"error": str(exc)})
        except ManifestInvalid as exc:
            return self.send(400, {"error": str(exc), "lines": [
                {"line": number, "error": error} for number, error in exc.errors]})
        except InvalidInput as exc:
            return self.send(400, {"error": str(exc)})
        except QuotaExceeded as exc:
            return self.send(429, {"error": (
                f"too many unfinished tasks from "
                f"{'your API key' if caller.key_id else 'your address'}: "
                f"{exc.verdict.pending} are "
                f"queued or running and the limit is {exc.verdict.limit}")})
        except QueueFull as exc:
            self.set_header("Retry-After", str(RETRY_AFTER_FULL))
            return self.send(503, {"error": f"the service is at capacity with {exc.queued} "
                                            "tasks waiting; try again later"})
        self.set_header("Location", f"/manifests/{manifest.id}")
        self.send(202, {"id": manifest.id, "lines": manifest.lines})

    def _ena_form(self, args: dict[str, list[str]]) -> str | None:
        """The accession of ``?ena=`` or of a form body ``ena=...`` (no
        checksum line starts so), else None: the body is a manifest."""
        if "ena" in args:
            return self.one(args, "ena") or ""
        kind = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        body = self.body
        # A form (curl -d ena=...&email=...) is one short line of fields; a
        # manifest whose text merely holds "&ena=" in a URL is a manifest.
        if kind == "application/x-www-form-urlencoded" and not self._too_big \
                and len(body) <= 4096 and b"\n" not in body.strip() and b" " not in body \
                and (body.startswith(b"ena=") or b"&ena=" in body):
            form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
            args.update({k: v for k, v in form.items() if k != "ena"})
            return self.one(form, "ena") or ""
        return None

    def arguments_from_query(self) -> dict[str, list[str]]:
        try:
            return {name: [v.decode("utf-8") for v in values]
                    for name, values in self.request.query_arguments.items()}
        except UnicodeDecodeError:
            raise web.HTTPError(400, log_message="query is not valid UTF-8") from None

    def _manifest_body(self) -> tuple[bytes, bool]:
        if self._too_big:
            self._refuse_oversized()
        if self.body:
            self._check_content_encoding()
        ctype = self.request.headers.get("Content-Type", "")
        kind = ctype.split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            fields: dict[str, list[bytes]] = {}
            files: dict[str, list[httputil.HTTPFile]] = {}
            try:
                httputil.parse_body_arguments(ctype, self.body, fields, files)
            except (ValueError, httputil.HTTPInputError) as exc:
                raise web.HTTPError(400, log_message=f"the form is not valid: {exc}") from None
            uploads = [f for group in files.values() for f in group]
            if len(uploads) != 1:
                raise web.HTTPError(400, log_message="send one manifest file in the form")
            return uploads[0].body, uploads[0].filename.lower().endswith(".json")
        # curl --data-binary says x-www-form-urlencoded: the body is still
        # the manifest, as it is for text/plain.
        return self.body, kind == "application/json"


class ManifestHandler(JsonHandler):
    """GET /manifests/<id>: totals and a page of lines, or ?format=text."""

    def initialize(self, manifests: ManifestRecords) -> None:
        self.manifests = manifests

    async def get(self, manifest_id: str) -> None:
        args = self.arguments()
        after, limit = self._int(args, "after", 0, 0, MAX_LINES * 2), \
            self._int(args, "limit", PAGE, 1, MAX_PAGE)
        fmt = self.one(args, "format") or "json"
        if fmt not in ("json", "text"):
            return self.send(400, {"error": "format must be json or text"})
        manifest = await self.db(self.manifests.get(manifest_id)) \
            if could_be_ours(manifest_id) else None
        if manifest is None:
            return self.send(404, NOT_FOUND)
        totals = await self.db(self.manifests.totals(manifest))
        if fmt == "text":
            return await self._text(manifest_id, manifest.last_line, totals)
        page = await self.db(self.manifests.lines(manifest_id, after, limit))
        last = after + limit
        more = last < manifest.last_line
        self.send(200, manifest_view(manifest, totals, page, last if more else None, limit))

    async def _text(self, manifest_id: str, last: int, totals: dict[str, int]) -> None:
        self.set_header("Content-Type", "text/plain; charset=UTF-8")
        for after in range(0, last, MAX_PAGE):
            page = await self.db(self.manifests.lines(manifest_id, after, MAX_PAGE))
            if page:
                self.write("".join(f"{line}\n" for line in check_lines(page)))
        self.finish("".join(f"{line}\n" for line in check_warnings(totals)))

    def _int(self, args: dict[str, list[str]], name: str, default: int, low: int,
             high: int) -> int:
        text = self.one(args, name)
        if text is None:
            return default
        number = whole_number(text)
        if number is None or not low <= number <= high:
            raise web.HTTPError(400, log_message=f"{name} must be a whole number from "
                                                 f"{low} to {high}")
        return number
