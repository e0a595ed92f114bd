"""What every md5-light handler shares: JSON out, JSON errors, bounded bodies,
and a database call that fails fast with 503 instead of hanging."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import pymongo
from pymongo.errors import PyMongoError
from tornado import httputil, web
from tornado.http1connection import HTTP1Connection

from service.intake.callers import Caller, Callers, Unauthorized

log = logging.getLogger("md5light.api")
T = TypeVar("T")

_UNIMPLEMENTED = web.RequestHandler.get

MAX_BODY = 64 * 1024
DRAIN_CAP = 1024 * 1024
# A dead database must cost a request well under a second: measured, the
# deadline bounds it whether the port is closed or the server accepts and
# never answers; a healthy one answers in milliseconds.
DB_TIMEOUT = 0.8
# How long a submit may wait for the batched insert it joined. Under a burst
# of thousands of submits the embedded database takes over a second per
# batch, and a 503 then would refuse (and often still store) a task it is
# about to accept. A dead database still fails the batch within a second:
# the API's client gives up selecting a server after SERVER_SELECTION_MS
# (run.py).
SUBMIT_PATIENCE = 3.0


def dumps(value: Any) -> str:
    # Compact and key-sorted: the original contract's bytes,
    # {"md5":"...","status":"done","url":"..."}.
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


class DatabaseUnavailable(web.HTTPError):
    def __init__(self) -> None:
        super().__init__(503, reason="Service Unavailable",
                         log_message="database unavailable")


@web.stream_request_body
class JsonHandler(web.RequestHandler):
    """Base class. Bodies stream in so that an oversized one is refused with
    413 while it arrives, rather than buffered first."""

    # The largest body this handler takes.
    max_body = MAX_BODY
    # Served without an API key even under REQUIRE_API_KEY (health checks,
    # metrics scrapers, the OpenAPI document, a browser's EventSource).
    open_without_key = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before super().__init__, which calls the subclass's initialize.
        self._body = bytearray()
        self._too_big = False
        self._caller: Caller | None = None
        super().__init__(*args, **kwargs)

    def compute_etag(self) -> None:
        return None  # task state changes; a 304 would hide that

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    async def prepare(self) -> None:
        self._check_body_length()
        callers: Callers = self.settings["callers"]
        if callers.judges(self.request) and not (
                self.open_without_key and "Authorization" not in self.request.headers):
            # A wrong or revoked key is a 401 wherever it is sent, before
            # any work (the body included): the caller learns at once.
            await self.caller()

    async def caller(self) -> Caller:
        """Who sent this request (application setting ``callers``); 401 for
        a key this service does not accept."""
        if self._caller is None:
            callers: Callers = self.settings["callers"]
            try:
                self._caller = await self.db(callers.identify(self.request))
            except Unauthorized as exc:
                raise web.HTTPError(401, log_message=str(exc).replace("%", "%%")) from None
        return self._caller

    def _check_body_length(self) -> None:
        length = self.request.headers.get("Content-Length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                raise web.HTTPError(400, reason="Bad Request",
                                    log_message="invalid Content-Length") from None
            if too_big:
                raise web.HTTPError(413, reason="Payload Too Large")
        # A chunked body is read on past the limit (and dropped), up to a
        # hard cap, so the client gets a clean 413 instead of a reset.
        connection = self.request.connection
        if isinstance(connection, HTTP1Connection):
            connection.set_max_body_size(max(DRAIN_CAP, self.max_body + 1))

    def data_received(self, chunk: bytes) -> None:
        if self._too_big or len(self._body) + len(chunk) > self.max_body:
            self._too_big = True
            self._body = bytearray()
            return
        self._body += chunk

    @property
    def body(self) -> bytes:
        # Made once: a 16 MiB manifest was copied at every use.
        if not isinstance(self._body, bytes):
            self._body = bytes(self._body)  # type: ignore[assignment]
        return self._body  # type: ignore[return-value]

    def send(self, status: int, payload: Any) -> None:
        self.set_status(status)
        self.finish(dumps(payload))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        messages = {
            400: "bad request", 401: "an API key is needed", 403: "forbidden",
            404: "not found", 405: "method not allowed",
            413: f"request body larger than {_size(self.max_body)}",
            503: "database unavailable, try again shortly",
        }
        message = messages.get(status_code, self._reason.lower())
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message \
                and status_code in (400, 401, 403, 415):
            message = exc.log_message % exc.args if exc.args else exc.log_message
        if status_code == 503:
            self.set_header("Retry-After", "5")
        if status_code == 401:
            error = ', error="invalid_token"' if "Authorization" in self.request.headers else ""
            self.set_header("WWW-Authenticate", f'Bearer realm="md5-light"{error}')
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        self.finish(dumps({"error": message}))

    def allowed_methods(self) -> list[str]:
        """The methods this handler implements, for 405's Allow header."""
        cls = type(self)
        allowed = [m for m in self.SUPPORTED_METHODS
                   if getattr(cls, m.lower(), _UNIMPLEMENTED) is not _UNIMPLEMENTED]
        return [m for m in allowed if m != "HEAD" or cls.get is not _UNIMPLEMENTED]

    def head(self, *args: Any, **kwargs: Any) -> Any:
        # HEAD is GET without the body (Tornado drops it), wherever GET exists.
        if type(self).get is _UNIMPLEMENTED:
            raise web.HTTPError(405)
        return self.get(*args, **kwargs)

    def log_exception(self, typ, value, tb) -> None:  # type: ignore[override]
        if isinstance(value, web.HTTPError):
            return  # expected: the client already got a JSON error
        # Not Tornado's default, which prints the query string (emails, URLs).
        log.error("uncaught exception in %s %s", self.request.method, self.request.path,
                  exc_info=(typ, value, tb))

    def arguments(self) -> dict[str, list[str]]:
        """Parameters from the query string, a form body or a JSON object
        body, as lists of strings. Bad encodings are a 400, never a 500."""
        if self._too_big:
            raise web.HTTPError(413, reason="Payload Too Large")
        merged: dict[str, list[str]] = {}

        def add(name: str, values: list[Any]) -> None:
            merged.setdefault(name, []).extend(values)

        try:
            for name, values in self.request.query_arguments.items():
                add(name, [v.decode("utf-8") for v in values])
            body = self.body
            ctype = self.request.headers.get("Content-Type", "")
            if body:
                self._check_content_encoding()
            if body and ctype.split(";")[0].strip().lower() == "application/json":
                for name, value in _json_members(body).items():
                    add(name, value)
            elif body:
                fields: dict[str, list[bytes]] = {}
                if not ctype:
                    ctype = "application/x-www-form-urlencoded"
                httputil.parse_body_arguments(ctype, body, fields, {}, self.request.headers)
                for name, values in fields.items():
                    add(name, [v.decode("utf-8") for v in values])
        except UnicodeDecodeError:
            raise web.HTTPError(400, log_message="request is not valid UTF-8") from None
        except (ValueError, httputil.HTTPInputError) as exc:
            raise web.HTTPError(400, log_message=f"request body is not valid: {exc}") from None
        for field, texts in merged.items():
            for text in [field, *texts]:
                _check_encodable(field, text)
        return merged

    def _check_content_encoding(self) -> None:
        # Decompressing would turn a 1 MiB upload into gigabytes of work;
        # nothing we accept is big enough to need compression.
        coding = self.request.headers.get("Content-Encoding", "identity").strip().lower()
        if coding != "identity":
            self.set_header("Accept-Encoding", "identity")
            raise web.HTTPError(415, reason="Unsupported Media Type",
                                log_message=f"Content-Encoding {coding[:40]} is not supported; "
                                            "send the body uncompressed")

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        # Tornado's own message quotes the raw bytes; say what to fix instead.
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise web.HTTPError(400, log_message="the request path is not valid UTF-8 "
                                                 "after percent-decoding") from None

    def one(self, args: dict[str, list[str]], name: str) -> str | None:
        values = args.get(name) or []
        if len(values) > 1:
            raise web.HTTPError(400, log_message=f"{name} given more than once")
        return values[0] if values else None

    async def db(self, call: Awaitable[T], patience: float = DB_TIMEOUT,
                 driver: float = DB_TIMEOUT) -> T:
        """Run a store call with a deadline; an unreachable database is a
        quick 503, not a hang and not a 500. pymongo.timeout bounds the
        driver's own calls (``driver``: longer only for the big inserts of
        a manifest; a dead database still fails server selection within
        a second); asyncio.timeout, ``patience``, bounds the whole, a
        submit waiting on an insert batch included."""
        try:
            async with asyncio.timeout(max(patience, driver)):
                with pymongo.timeout(driver):
                    return await call
        except (PyMongoError, TimeoutError) as exc:
            log.warning("database call failed: %s", type(exc).__name__)
            raise DatabaseUnavailable() from None


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 1024} KiB"


class NotFoundHandler(JsonHandler):
    async def prepare(self) -> None:
        await super().prepare()
        raise web.HTTPError(404)


class _Pairs(list):
    """A JSON object as its (name, value) pairs, repeats kept."""


def _json_members(body: bytes) -> dict[str, list[str]]:
    """The members of a JSON object body, each a string, a list of strings
    (``"algorithms": ["sha256", "sha512"]``) or null. A repeated name is
    refused: json.loads alone would keep the last and hide a second url."""
    try:
        pairs = json.loads(body.decode("utf-8"), object_pairs_hook=_Pairs)
    except RecursionError:
        # [[[[... tens of thousands deep: the C parser stops at the
        # interpreter's recursion limit; it is the client's error.
        raise ValueError("JSON is nested too deeply") from None
    if not isinstance(pairs, _Pairs):
        raise ValueError("JSON body must be an object")
    members: dict[str, list[str]] = {}
    for name, value in pairs:
        if name in members:
            raise web.HTTPError(400, log_message=f"{name} given more than once")
        if (isinstance(value, list) and not isinstance(value, _Pairs)
                and all(isinstance(v, str) for v in value)):
            members[name] = value
        elif value is None or isinstance(value, str):
            members[name] = [value] if value is not None else []
        else:
            raise ValueError(f"{name} must be a string or a list of strings")
    return members


def _check_encodable(name: str, value: str) -> None:
    """A lone surrogate (JSON's \\ud800) decodes to a str that cannot be
    stored; refuse it here, before it reaches a batched insert."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        shown = name.encode("utf-8", "backslashreplace").decode("ascii")
        raise web.HTTPError(400, log_message=f"{shown} is not valid Unicode: it contains a "
                                             "lone surrogate such as \\ud800") from None
