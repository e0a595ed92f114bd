"""Download ftp:// and ftps:// URLs into the same digests as HTTP.

The FTP client is the standard library's ``ftplib``, each download on a
thread of its own (its blocking calls are awaited one at a time from the
IOLoop, which keeps the hashing, the watchdog and every decision): see
docs/design.md, "FTP", for why not an asyncio FTP library. What the HTTP
path promises holds here too:

- The address policy applies to the control connection: the host is
  resolved by the same ``FilteringResolver`` (RESOLVE overrides included)
  and ftplib connects to an address it let through, never resolving the
  name again. The data connection goes to that same address, always:
  EPSV first (it names only a port); a server without EPSV is asked PASV,
  and a PASV answer that names another address is refused (the FTP
  bounce), never followed.
- Passive mode only, binary (TYPE I), anonymous login; ``ftps://`` is TLS
  from the first byte (implicit, port 990 by default, as curl and lftp
  read it), certificate checked against the URL's host, the data
  connection encrypted too (PROT P) and resuming the control
  connection's TLS session, as servers that check it require.
- SIZE gives ``bytes_total`` (progress) and MAX_FILE_SIZE is checked
  before the transfer; a transfer shorter than SIZE is ``truncated``.
- FTP has no ETag: a file's version is its SIZE and MDTM (modification
  time). A download larger than RESUMABLE_MIN_SIZE is checkpointed under
  that validator and a retry resumes with REST only if SIZE and MDTM are
  unchanged; otherwise it starts over (``resume_note`` says why). Both are
  asked again after the transfer: a file that changed while it was being
  read fails the attempt as ``changed`` (retried, from byte 0), so a
  digest never mixes two versions.
- The watchdog, the abort (closing the sockets wakes the blocked thread)
  and the give-up after ABORT_GRACE work as the HTTP download's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ftplib
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tornado.httputil import HTTPHeaders

from service.config import Config, human_size
from service.fetch import stall
from service.fetch.checkpoint import RESUMABLE_ALGORITHMS, Checkpoint
from service.fetch.download import Fetched
from service.fetch.errors import FetchError, Interrupted, classify
from service.fetch.hashing import DigestSink
from service.fetch.netpolicy import AddressPolicy, FilteringResolver, parse_overrides
from service.fetch.resume import Resumer
from service.model.digests import ALWAYS
from service.model.same_file import KnownFile

DEFAULT_PORTS = {"ftp": 21, "ftps": 990}
SCHEMES = tuple(DEFAULT_PORTS)
# Hosts whose paths people paste without a scheme (ENA's file reports list
# "ftp.sra.ebi.ac.uk/vol1/..."): such a "URL" is read as ftp://.
BARE_HOSTS = ("ftp.sra.ebi.ac.uk", "ftp.ebi.ac.uk", "ftp.ncbi.nlm.nih.gov",
              "ftp.ddbj.nig.ac.jp")
# RFC 1635: anonymous FTP asks for an address-like password.
ANONYMOUS = ("anonymous", "md5-light@")
# The reading thread hands over what it received once it has this much,
# or once this long has passed (so that progress shows on slow links).
BLOCK = 1024 * 1024
HAND_OVER = 0.25
ABORT_GRACE = 2.0
_VALIDATOR = "ftp size={size} mdtm={mdtm}"

T = TypeVar("T")


def with_scheme(url: str) -> str:
    """``ftp.sra.ebi.ac.uk/vol1/x`` -> ``ftp://ftp.sra.ebi.ac.uk/vol1/x``
    for the known FTP hosts; anything else unchanged."""
    host = url.split("/", 1)[0].lower()
    return f"ftp://{url}" if host in BARE_HOSTS and "/" in url else url


def path_problem(path: str) -> str | None:
    """Why this URL path cannot name a file to RETR (None: it can)."""
    decoded = urllib.parse.unquote(path)
    if any(ord(c) < 32 or ord(c) == 127 for c in decoded):
        # %0D%0A would end the RETR command and start another.
        return "must not contain encoded control characters (%0D, %0A, %00...)"
    if decoded.strip("/") == "" or decoded.endswith("/"):
        return "must name a file, not a directory"
    return None


def ftp_path(url: str) -> str:
    """What RETR asks for: the URL's path percent-decoded, relative to the
    login directory as RFC 1738 reads it (``%2F`` makes it absolute)."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path[1:])


class PasvElsewhere(Exception):
    """A PASV answer named another address than the control connection's."""

    def __init__(self, named: str, peer: str):
        super().__init__(named, peer)
        self.named, self.peer = named, peer


def _pinned_pasv(ftp: ftplib.FTP) -> tuple[str, int]:
    """The data connection's address: the control connection's own, and
    the port EPSV (or PASV) names."""
    assert ftp.sock is not None
    peer = ftp.sock.getpeername()[0]
    try:
        return peer, ftplib.parse229(ftp.sendcmd("EPSV"), ftp.sock.getpeername())[1]
    except ftplib.error_perm:
        if ftp.af != socket.AF_INET:
            raise
    named, port = ftplib.parse227(ftp.sendcmd("PASV"))
    if named != peer:
        raise PasvElsewhere(named, peer)
    return peer, port


def _open(ftp: ftplib.FTP, family: int, address: tuple, host: str, timeout: float,
          context: ssl.SSLContext | None) -> None:
    """Connect to ``address`` (already approved by the policy) as ftplib's
    connect would to ``host``; with ``context``, TLS before the greeting
    (implicit FTPS), its certificate checked against ``host``."""
    ftp.host, ftp.port, ftp.timeout = host, address[1], timeout
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        ftp.sock = context.wrap_socket(sock, server_hostname=host) if context else sock
    except BaseException:
        sock.close()
        raise
    ftp.af = family
    ftp.file = ftp.sock.makefile("r", encoding=ftp.encoding)
    ftp.welcome = ftp.getresp()


class _Plain(ftplib.FTP):
    def makepasv(self) -> tuple[str, int]:
        return _pinned_pasv(self)


class _Implicit(ftplib.FTP_TLS):
    """ftps://: the data connection's TLS resumes the control
    connection's session, as servers that check it require."""

    def makepasv(self) -> tuple[str, int]:
        return _pinned_pasv(self)

    def ntransfercmd(self, cmd: str,
                     rest: int | str | None = None) -> tuple[socket.socket, int | None]:
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        session = self.sock.session if isinstance(self.sock, ssl.SSLSocket) else None
        return self.context.wrap_socket(conn, server_hostname=self.host,
                                        session=session), size


class _FtpResumer(Resumer):
    """The HTTP resumer's bookkeeping (due, latest, progress) under FTP's
    validator, SIZE and MDTM."""

    def begin_with(self, sink: DigestSink, size: int, validator: str) -> None:
        self._validator, self._total, self._claim = validator, size, None
        sink.make_resumable()


class _StartOver(Interrupted):
    """The REST offset was refused: fetch from byte 0."""


class FtpDownload:
    """One fetch of one ftp:// or ftps:// URL into its digests; the same
    face to the worker as ``download.Download``."""

    def __init__(self, url: str, config: Config, executor: Any,
                 algorithms: list[str] | None = None, checkpoint: Checkpoint | None = None,
                 revalidate: KnownFile | None = None):
        self.url = url
        parts = urllib.parse.urlsplit(url)
        self.scheme = parts.scheme.lower()
        self.host = parts.hostname or ""
        self.port = parts.port or DEFAULT_PORTS[self.scheme]
        self.path = ftp_path(url)
        self.config = config
        self.algorithms = list(algorithms or [ALWAYS])
        if checkpoint is not None and not checkpoint.validator.startswith("ftp "):
            checkpoint = None  # another protocol's (an HTTPS mirror's): not ours
        self.resume = _FtpResumer(config, self.algorithms, checkpoint)
        self.revalidate = revalidate if checkpoint is None else None
        self.fetched = 0
        self._executor = executor
        self._resolver = FilteringResolver(
            policy=AddressPolicy(config.allow_private_urls, config.allow_networks),
            overrides=parse_overrides(config.resolve))
        self._begin()

    def _begin(self) -> None:
        self.sink = DigestSink(self.algorithms, self._executor)
        self.bytes_done = 0
        self.bytes_total: int | None = None
        self.error: FetchError | Interrupted | None = None
        self.last_progress = time.monotonic()
        self._mark = (time.monotonic(), 0)
        self._ftp: ftplib.FTP | None = None
        self._data: socket.socket | None = None
        self._gave_up: asyncio.Future | None = None
        self._thread: ThreadPoolExecutor | None = None

    # -- control (the same as Download's) -------------------------------

    def abort(self, error: FetchError | Interrupted) -> None:
        if self.error is None or isinstance(self.error, _StartOver):
            self.error = error
        # Shutting the sockets down wakes the thread blocked on them.
        for sock in (self._data, self._ftp.sock if self._ftp else None):
            if sock is not None:
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
        if self._gave_up is not None and not self._gave_up.done():
            asyncio.get_running_loop().call_later(ABORT_GRACE, stall.give_up, self._gave_up)

    def _watch(self) -> None:
        if self.error is not None:
            return
        self._mark, stalled = stall.check(self.config, self.host, self._mark,
                                          self.bytes_done, self.last_progress)
        if stalled is not None:
            self.abort(stalled)

    def checkpoint(self, due: bool = False) -> Checkpoint | None:
        return self.resume.due(self.sink) if due else self.resume.latest(self.sink)

    def progress(self) -> dict[str, Any]:
        return self.resume.progress(self.fetched)

    # -- the fetch ----------------------------------------------------------

    async def run(self) -> Fetched:
        try:
            return await self._guarded()
        except _StartOver:
            self._begin()
            return await self._guarded()

    async def _guarded(self) -> Fetched:
        loop = asyncio.get_running_loop()
        self._gave_up = loop.create_future()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftp")
        watchdog = loop.call_later(1.0, self._tick)
        self._watchdog: asyncio.TimerHandle | None = watchdog
        try:
            return await self._run_once()
        except (FetchError, Interrupted):
            await self.sink.discard()
            raise
        except Exception as exc:  # noqa: BLE001 - classified, as Download's are
            await self.sink.discard()
            if self.error is not None:
                raise self.error from None
            raise _classify(exc, self.host, self.bytes_done, self.config) from None
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            self._close()
            self._thread.shutdown(wait=False)

    def _tick(self) -> None:
        self._watch()
        if self._watchdog is not None:
            self._watchdog = asyncio.get_running_loop().call_later(1.0, self._tick)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one blocking ftplib step on this download's thread; an
        abort (or a step that outlives its abort by ABORT_GRACE) ends it."""
        if self.error is not None:
            raise self.error
        assert self._thread is not None and self._gave_up is not None
        step = asyncio.wrap_future(self._thread.submit(fn, *args))
        await asyncio.wait([step, self._gave_up], return_when=asyncio.FIRST_COMPLETED)
        if not step.done():
            step.add_done_callback(_ignore_outcome)
        if self.error is not None:
            raise self.error
        return step.result()

    async def _run_once(self) -> Fetched:
        ftp = await self._connect()
        size = await self._call(_size, ftp, self.path)
        mdtm = await self._call(_mdtm, ftp, self.path)
        validator = _VALIDATOR.format(size=size, mdtm=mdtm) if size is not None and mdtm \
            else None
        if size is not None and size > self.config.max_file_size:
            raise self._too_large()
        known = self.revalidate
        if known is not None and validator is not None and known.etag == validator:
            # The same SIZE and MDTM as the download the digests are of.
            return Fetched({a: known.digests[a] for a in self.algorithms}, etag=validator,
                           not_modified=True)
        self.bytes_total = size
        rest = self._resume_offset(size, validator)
        try:
            conn, _ = await self._call(ftp.ntransfercmd, f"RETR {self.path}", rest)
        except ftplib.error_perm as exc:
            if rest is None or not str(exc).startswith(("500", "501", "502", "504", "554")):
                raise
            self.resume.offered = self.resume.saved = None
            self.resume.started_over = (f"the server refused REST {rest} ({_reply(exc)}); "
                                        "the download started over from byte 0")
            raise _StartOver("REST refused") from None
        self._data = conn
        if rest is not None:
            self.resume.continue_into(self.sink, HTTPHeaders())
            self.bytes_done = rest
        else:
            self._begin_fresh(size, validator)
        self._mark = (time.monotonic(), self.bytes_done)
        while True:
            block = await self._call(_read_block, conn)
            if not block:
                break
            self.bytes_done += len(block)
            self.fetched += len(block)
            self.last_progress = time.monotonic()
            if self.bytes_done > self.config.max_file_size:
                raise self._too_large()
            pending = self.sink.feed(block)
            if pending is not None:
                await pending
        self._data = None
        await self._call(_end_transfer, ftp, conn)
        if size is not None and self.bytes_done != size:
            raise FetchError("truncated", f"{self.host} sent {self.bytes_done} bytes but "
                             f"SIZE announced {size}", True)
        after = (await self._call(_size, ftp, self.path), await self._call(_mdtm, ftp, self.path))
        if after != (size, mdtm):
            self.resume.corrupted()  # none of these bytes may be continued
            raise FetchError("changed", (
                f"the file on {self.host} changed during the download (SIZE {size} -> "
                f"{after[0]}, MDTM {mdtm} -> {after[1]}); it is fetched again"), True)
        digests = await self.sink.hexdigests()
        with contextlib.suppress(Exception):
            await self._call(ftp.putcmd, "QUIT")  # not waiting for its answer
        return Fetched({a: digests[a] for a in self.algorithms}, etag=validator)

    async def _connect(self) -> ftplib.FTP:
        answers = await self._resolver.resolve(self.host, self.port)
        last: BaseException | None = None
        for family, address in answers:
            ftp: ftplib.FTP
            context = ssl.create_default_context() if self.scheme == "ftps" else None
            ftp = _Implicit(context=context) if context else _Plain()
            self._ftp = ftp
            try:
                await self._call(_open, ftp, family, address, self.host,
                                 self.config.connect_timeout, context)
            except (OSError, EOFError) as exc:
                if self.error is not None:
                    raise self.error from None
                last = exc
                continue
            break
        else:
            raise last or OSError("no address to connect to")
        # From here a blocked read wakes when the watchdog shuts it down;
        # the socket's own timeout only ends a thread nobody waits for.
        assert ftp.sock is not None
        ftp.sock.settimeout(max(self.config.idle_timeout * 2, 30))
        ftp.timeout = ftp.sock.gettimeout()
        await self._call(ftp.login, *ANONYMOUS)
        if isinstance(ftp, _Implicit):
            await self._call(ftp.prot_p)
        await self._call(ftp.voidcmd, "TYPE I")
        return ftp

    def _resume_offset(self, size: int | None, validator: str | None) -> int | None:
        offered = self.resume.offered
        if offered is None:
            return None
        if validator == offered.validator and size == offered.total:
            return offered.offset
        self.resume.offered = self.resume.saved = None
        now = _VALIDATOR.format(size=size, mdtm=None) if validator is None else validator
        self.resume.started_over = (
            f"the file's SIZE or MDTM changed since the checkpoint ({offered.validator[4:]} "
            f"then, {now[4:]} now): another version of the file, so the download "
            "started over from byte 0")
        return None

    def _begin_fresh(self, size: int | None, validator: str | None) -> None:
        """A transfer from byte 0: checkpoint it if it is worth it and possible."""
        cannot = [a for a in self.sink.algorithms if a not in RESUMABLE_ALGORITHMS]
        if size is None:
            self.resume.note = "the server did not announce the file's size (SIZE)"
        elif size <= self.config.resumable_min_size:
            self.resume.note = ("the file is not larger than RESUMABLE_MIN_SIZE; a retry "
                                "fetches it again")
        elif cannot:
            self.resume.note = (f"the {', '.join(cannot)} hash state cannot be saved; a retry "
                                "fetches the file again (ask for md5, sha1, sha256 or "
                                "sha512 only to resume)")
        elif validator is None:
            self.resume.note = ("the server gave no modification time (MDTM), so a retry "
                                "could not tell whether the file changed")
        else:
            self.resume.begin_with(self.sink, size, validator)

    def _too_large(self) -> FetchError:
        return FetchError("too_large",
                          f"file larger than {human_size(self.config.max_file_size)} limit", False)

    def _close(self) -> None:
        for sock in (self._data, self._ftp.sock if self._ftp else None):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._data = None


# -- the blocking steps, on the download's thread ---------------------------

def _size(ftp: ftplib.FTP, path: str) -> int | None:
    try:
        return ftp.size(path)
    except ftplib.error_perm as exc:
        if str(exc).startswith("550"):
            raise  # no such file (or a directory): permanent
        return None  # SIZE not implemented


def _mdtm(ftp: ftplib.FTP, path: str) -> str | None:
    try:
        reply = ftp.sendcmd(f"MDTM {path}")
    except ftplib.error_perm:
        return None
    value = reply[4:].strip()
    return value if reply.startswith("213") and value else None


def _read_block(conn: socket.socket) -> bytes:
    """What arrived, up to BLOCK bytes or HAND_OVER seconds; b"" at the end."""
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    got = 0
    started = time.monotonic()
    while got < BLOCK:
        n = conn.recv_into(view[got:])
        if n == 0:
            break
        got += n
        if time.monotonic() - started >= HAND_OVER:
            break
    return bytes(view[:got])


def _end_transfer(ftp: ftplib.FTP, conn: socket.socket) -> None:
    if isinstance(conn, ssl.SSLSocket):
        with contextlib.suppress(OSError, ValueError):
            conn.unwrap()
    conn.close()
    ftp.voidresp()


def _ignore_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _reply(exc: BaseException) -> str:
    return str(exc).strip()[:200]


def _classify(exc: BaseException, host: str, bytes_done: int, config: Config) -> FetchError:
    """The FetchError for what ftplib (or a socket under it) raised."""
    if isinstance(exc, PasvElsewhere):
        return FetchError("blocked", (
            f"the FTP server {host} asked for the data connection to go to {exc.named}, "
            f"not to its own address {exc.peer}; this service refuses that (an FTP bounce "
            "or a server behind NAT that does not know its address; a server that "
            "supports EPSV avoids it)"), False)
    if isinstance(exc, ftplib.error_temp):
        return FetchError("ftp_status", f"FTP {_reply(exc)} from {host}", True)
    if isinstance(exc, ftplib.error_perm):
        reply = _reply(exc)
        if reply.startswith("530"):
            return FetchError("ftp_status", f"{host} does not allow anonymous FTP "
                              f"({reply})", False)
        return FetchError("ftp_status", f"FTP {reply} from {host}", False)
    if isinstance(exc, (ftplib.error_reply, ftplib.error_proto)):
        return FetchError("bad_response", f"{host} answered unexpectedly: {_reply(exc)}",
                          False)
    if isinstance(exc, EOFError):
        got = f" after {bytes_done} bytes" if bytes_done else ""
        return FetchError("connection", f"connection to {host} closed{got}", True)
    if isinstance(exc, TimeoutError):
        return FetchError("timeout", f"timed out talking to {host}", True)
    return classify(exc, host, bytes_done, config.connect_timeout)
