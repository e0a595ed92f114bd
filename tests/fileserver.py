"""Real HTTP file servers on 127.0.0.1 for the tests: every way a server can
send (or fail to send) a file. Bodies are deterministic pseudo-random bytes,
so a test computes the expected md5 with hashlib over the same bytes."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import random
import socket
import threading
import time
from functools import lru_cache

from tornado import web
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.netutil import bind_sockets

BLOCK = 1024 * 1024


def blocks(size: int, seed: int = 0):
    """The body of /bytes/<size>?seed=<seed>, one MiB at a time."""
    rng = random.Random(f"{seed}-{size}")
    left = size
    while left > 0:
        n = min(BLOCK, left)
        yield rng.randbytes(n)
        left -= n


@lru_cache(maxsize=64)
def body(size: int, seed: int = 0) -> bytes:
    return b"".join(blocks(size, seed))


def md5_of(size: int, seed: int = 0) -> str:
    h = hashlib.md5()
    for block in blocks(size, seed):
        h.update(block)
    return h.hexdigest()


class _Base(web.RequestHandler):
    def compute_etag(self):
        return None

    def seed(self) -> int:
        return int(self.get_argument("seed", "0"))


class BytesHandler(_Base):
    """Content-Length body."""

    async def get(self, size: str) -> None:
        n = int(size)
        self.set_header("Content-Length", str(n))
        self.set_header("Content-Type", "application/octet-stream")
        for block in blocks(n, self.seed()):
            self.write(block)
            await self.flush()


class ChunkedHandler(_Base):
    """Transfer-Encoding: chunked (no Content-Length, several flushes)."""

    async def get(self, size: str) -> None:
        n = int(size)
        for block in blocks(n, self.seed()):
            for i in range(0, len(block), 7919):  # odd chunk sizes
                self.write(block[i:i + 7919])
                await self.flush()


class RedirectHandler(_Base):
    def get(self, hops: str, rest: str) -> None:
        k = int(hops)
        code = int(self.get_argument("code", "302"))
        query = f"?{self.request.query}" if self.request.query else ""
        target = f"/redirect/{k - 1}/{rest}{query}" if k > 1 else f"/{rest}{query}"
        self.redirect(target, status=code)


class RedirectToHandler(_Base):
    def get(self) -> None:
        self.redirect(self.get_argument("to"), status=302)


class StatusHandler(_Base):
    def get(self, code: str) -> None:
        self.set_status(int(code))
        if self.get_argument("retry_after", None):
            self.set_header("Retry-After", self.get_argument("retry_after"))
        self.finish(f"<html>error page {code}</html>")


class FlakyHandler(_Base):
    """Fails the first `fails` requests for a key with `code`, then serves."""

    counts: dict[str, int] = {}

    async def get(self, key: str, size: str) -> None:
        count = self.counts[key] = self.counts.get(key, 0) + 1
        if count <= int(self.get_argument("fails", "1")):
            self.set_status(int(self.get_argument("code", "503")))
            if self.get_argument("retry_after", None):
                self.set_header("Retry-After", self.get_argument("retry_after"))
            self.finish("try again")
            return
        n = int(size)
        self.set_header("Content-Length", str(n))
        self.write(body(n, self.seed()))


class CountingHandler(_Base):
    """Serves /bytes/<size> and counts requests per key: proves each task
    was downloaded exactly once."""

    hits: dict[str, int] = {}

    def get(self, key: str, size: str) -> None:
        self.hits[key] = self.hits.get(key, 0) + 1
        n = int(size)
        self.set_header("Content-Length", str(n))
        self.finish(body(n, self.seed()))


class ShortHandler(_Base):
    """Announces `size` bytes, sends half, then hangs up."""

    async def get(self, size: str) -> None:
        n = int(size)
        self.set_header("Content-Length", str(n))
        self.write(body(n, self.seed())[: n // 2])
        await self.flush()
        self.request.connection.stream.close()


class SlowHandler(_Base):
    """Sends `size` bytes in `parts` pieces, `delay` seconds apart."""

    async def get(self, size: str) -> None:
        n = int(size)
        parts = int(self.get_argument("parts", "10"))
        delay = float(self.get_argument("delay", "0.2"))
        data = body(n, self.seed())
        self.set_header("Content-Length", str(n))
        step = max(1, -(-n // parts))
        for i in range(0, n, step):
            self.write(data[i:i + step])
            await self.flush()
            await asyncio.sleep(delay)


class TrickleHandler(_Base):
    """One byte a second, forever (until the client gives up)."""

    async def get(self) -> None:
        while True:
            self.write(b"x")
            await self.flush()
            await asyncio.sleep(1.0)


class StallHandler(_Base):
    """Headers, then silence (connection kept open)."""

    async def get(self) -> None:
        self.set_header("Content-Length", "1000000")
        await self.flush()
        await asyncio.sleep(3600)


class EndlessHandler(_Base):
    async def get(self) -> None:
        block = body(BLOCK, 7)
        while True:
            self.write(block)
            await self.flush()


class GzipHandler(_Base):
    """A gzip-encoded body: the md5 is of the bytes sent, not decompressed."""

    def get(self, size: str) -> None:
        data = gzip_body(int(size))
        self.set_header("Content-Encoding", "gzip")
        self.set_header("Content-Type", "text/plain")
        self.finish(data)


@lru_cache(maxsize=8)
def gzip_body(size: int) -> bytes:
    return gzip.compress(b"hello md5-light\n" * (size // 16), mtime=0)


class ClaimsHandler(_Base):
    """/bytes/<size> with the digest header a test names, the way servers
    write it: ?header=repr|content|digest|content-md5|etag (alg= for the
    first three: RFC 9530's sha-256, sha-512, md5). wrong=1 claims the
    digest of other bytes; corrupt=<key>:<n> flips a byte of the body in
    the first n requests for key. Remembers the Want-Repr-Digest it got."""

    seen_want: list[str] = []
    counts: dict[str, int] = {}

    def get(self, size: str) -> None:
        data = body(int(size), self.seed())
        self.seen_want.append(self.request.headers.get("Want-Repr-Digest", ""))
        claimed = data + b"!" if self.get_argument("wrong", None) else data
        header = self.get_argument("header")
        name = self.get_argument("alg", "sha-256")
        raw = hashlib.new(name.replace("-", ""), claimed).digest()
        b64 = base64.b64encode(raw).decode()
        if header in ("repr", "content"):
            self.set_header(f"{header.title()}-Digest", f"{name}=:{b64}:")
        elif header == "digest":
            self.set_header("Digest", f"{name.upper()}={b64}")
        elif header == "content-md5":
            self.set_header("Content-MD5", base64.b64encode(hashlib.md5(claimed).digest()))
        elif header == "etag":
            self.set_header("ETag", f'"{hashlib.md5(claimed).hexdigest()}"')
        key, _, n = self.get_argument("corrupt", ":0").partition(":")
        count = self.counts[key] = self.counts.get(key, 0) + 1
        if count <= int(n) and data:
            data = bytes([data[0] ^ 1]) + data[1:]
        self.set_header("Content-Length", str(len(data)))
        self.finish(data)


def _crc(name: str, data: bytes) -> bytes:
    from service.model.digests import new_hash
    h = new_hash(name)
    h.update(data)
    return h.digest()


def _parts_digest(name: str, data: bytes, part: int) -> tuple[bytes, int]:
    """The digest of the parts' digests (S3's multipart ETag, COMPOSITE)."""
    digests = [_crc(name, data[i:i + part]) for i in range(0, len(data), part)] or \
        [_crc(name, b"")]
    return _crc(name, b"".join(digests)), len(digests)


class StoreClaimsHandler(_Base):
    """/bytes/<size> with the headers object stores send, for stores this
    suite cannot run (GCS, Azure) and S3 shapes moto does not make:
    ?amz=<crc64nvme|crc32c|crc32|sha1|sha256>&type=FULL_OBJECT|COMPOSITE
    (COMPOSITE with part=<bytes>); etag=<part bytes> (S3's multipart ETag);
    goog=crc32c,md5 (x-goog-hash, one header per digest); azure=1
    (x-ms-blob-content-md5). wrong=1 claims other bytes' digests.
    Remembers the x-amz-checksum-mode of each request."""

    seen_mode: list[str | None] = []

    def get(self, size: str) -> None:
        data = body(int(size), self.seed())
        self.seen_mode.append(self.request.headers.get("x-amz-checksum-mode"))
        claimed = data + b"!" if self.get_argument("wrong", None) else data
        amz = self.get_argument("amz", None)
        if amz:
            kind = self.get_argument("type", "FULL_OBJECT")
            if kind == "COMPOSITE":
                raw, parts = _parts_digest(amz, claimed, int(self.get_argument("part")))
                value = f"{base64.b64encode(raw).decode()}-{parts}"
            else:
                value = base64.b64encode(_crc(amz, claimed)).decode()
            self.set_header(f"x-amz-checksum-{amz}", value)
            self.set_header("x-amz-checksum-type", kind)
        if self.get_argument("etag", None):
            raw, parts = _parts_digest("md5", claimed, int(self.get_argument("etag")))
            self.set_header("ETag", f'"{raw.hex()}-{parts}"')
        for name in filter(None, self.get_argument("goog", "").split(",")):
            self.add_header("x-goog-hash",
                            f"{name}={base64.b64encode(_crc(name, claimed)).decode()}")
        if self.get_argument("azure", None):
            self.set_header("x-ms-blob-content-md5",
                            base64.b64encode(hashlib.md5(claimed).digest()).decode())
        self.set_header("Content-Length", str(len(data)))
        self.finish(data)


class PresignedHandler(_Base):
    """What S3 answers a presigned URL's request carrying an x-amz-* header
    its signature does not cover: 403 AccessDenied."""

    def get(self, size: str) -> None:
        if self.request.headers.get("x-amz-checksum-mode"):
            self.set_status(403)
            self.finish("<Error><Code>AccessDenied</Code><Message>There were headers present "
                        "in the request which were not signed</Message></Error>")
            return
        data = body(int(size), self.seed())
        self.set_header("Content-Length", str(len(data)))
        self.finish(data)


def make_app() -> web.Application:
    return web.Application([
        (r"/bytes/(\d+)", BytesHandler),
        (r"/chunked/(\d+)", ChunkedHandler),
        (r"/redirect/(\d+)/(.*)", RedirectHandler),
        (r"/redirect-to", RedirectToHandler),
        (r"/status/(\d+)", StatusHandler),
        (r"/flaky/([\w-]+)/(\d+)", FlakyHandler),
        (r"/short/(\d+)", ShortHandler),
        (r"/count/([\w-]+)/(\d+)", CountingHandler),
        (r"/slow/(\d+)", SlowHandler),
        (r"/trickle", TrickleHandler),
        (r"/stall", StallHandler),
        (r"/endless", EndlessHandler),
        (r"/gzip/(\d+)", GzipHandler),
        (r"/claims/(\d+)", ClaimsHandler),
        (r"/store/(\d+)", StoreClaimsHandler),
        (r"/presigned/(\d+)", PresignedHandler),
        (r"/range/([\w-]+)/(\d+)", RangeHandler),
        (r"/versioned/([\w-]+)/(\d+)", VersionedHandler),
        (r"/pieces/([\w-]+)/(\d+)", PiecesHandler),
    ])


class ThreadedServer:
    """A Tornado file server on its own IOLoop in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            sockets = bind_sockets(0, self.host, family=socket.AF_INET)
            self.port = sockets[0].getsockname()[1]
            server = HTTPServer(make_app())
            server.add_sockets(sockets)
            self._ready.set()
            await asyncio.Event().wait()

        asyncio.run(main())

    def start(self) -> "ThreadedServer":
        self._thread.start()
        self._ready.wait(10)
        return self

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"


class RawUntilCloseServer:
    """An HTTP/1.0-style server: no Content-Length, no chunking, the body
    ends when the connection closes. Tornado's documented trap."""

    def __init__(self, size: int, seed: int = 3):
        self.size, self.seed = size, seed
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
                for block in blocks(self.size, self.seed):
                    conn.sendall(block)
            except OSError:
                pass

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file.bin"


class RawResponseServer:
    """Answers every connection with the same bytes, verbatim: for responses
    no well-behaved server library would send (bad framing, chunk
    extensions, interim 1xx answers, HTTP/0.9)."""

    def __init__(self, response: bytes):
        self.response = response
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            self.hits += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(self.response)
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)  # until the client hangs up
            except OSError:
                pass

    def url(self, path: str = "/file.bin") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


class ThrottleHandler(_Base):
    """/throttle/<key>/<size>?parts=&delay=: a slow download that records,
    per key, each request's client address, the bytes it was sent and
    whether the client hung up first (``ThrottleHandler.requests``)."""

    requests: dict[str, list[dict]] = {}

    async def get(self, key: str, size: str) -> None:
        n = int(size)
        parts = int(self.get_argument("parts", "10"))
        delay = float(self.get_argument("delay", "0.2"))
        data = body(n, self.seed())
        record = {"peer": self.request.remote_ip, "sent": 0, "hung_up": False,
                  "ended_at": None}
        self.requests.setdefault(key, []).append(record)
        self.set_header("Content-Length", str(n))
        step = max(1, -(-n // parts))
        try:
            for i in range(0, n, step):
                self.write(data[i:i + step])
                await self.flush()
                record["sent"] = min(n, i + step)
                await asyncio.sleep(delay)
        except StreamClosedError:
            record["hung_up"] = True
        record["ended_at"] = time.monotonic()

    def on_connection_close(self) -> None:
        for record in self.requests.get(self.path_args[0], []):
            if record["peer"] == self.request.remote_ip and record["ended_at"] is None:
                record["hung_up"] = True
                record["ended_at"] = time.monotonic()


class RangeHandler(_Base):
    """/range/<key>/<size>: a file that honours (or not) Range and If-Range,
    and counts on the server side what each request was sent
    (``RangeHandler.requests[key]``: range, if_range, status, sent).

    ?validator=etag (strong, the default) | weak | lastmod | none;
    ?mode=ranges (the default) | ignore (200 to a Range) | 416 | elsewhere
    (a 206 from another offset) | noifrange (a Range is honoured whatever
    If-Range says: a 206 of the current version, under its own validator)
    | bare206 (206s carry no validator); ?cut=N: the first ``cuts`` (1) answers
    hang up after N body bytes; ?change=N: from the N+1-th request on the
    file is another one (other bytes, other validator); ?delay=: seconds
    between 256 KiB pieces."""

    requests: dict[str, list[dict]] = {}

    async def get(self, key: str, size: str) -> None:
        log = self.requests.setdefault(key, [])
        version = 1 if len(log) >= int(self.get_argument("change", "1000000")) else 0
        n = int(size)
        data = body(n, self.seed() + version)
        record = {"range": self.request.headers.get("Range"),
                  "if_range": self.request.headers.get("If-Range"), "status": 200, "sent": 0}
        log.append(record)
        current = self._validators(version)
        for name, value in current.items():
            self.set_header(name, value)
        if self.get_argument("repr", None):  # the whole file's, on a 206 too
            digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
            self.set_header("Repr-Digest", f"sha-256=:{digest}:")
        mode = self.get_argument("mode", "ranges")
        if_range = None if mode == "noifrange" else record["if_range"]
        start = self._start(record["range"], if_range, current, n)
        if start is not None and mode == "416":
            record["status"] = 416
            self.set_status(416)
            self.set_header("Content-Range", f"bytes */{n}")
            self.finish()
            return
        if start is not None and mode in ("ranges", "elsewhere", "noifrange", "bare206"):
            if mode == "elsewhere":
                start = max(0, start - 1000)
            if mode == "bare206":
                for name in current:
                    self.clear_header(name)
            record["status"] = 206
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {start}-{n - 1}/{n}")
        else:
            start = 0
        self.set_header("Content-Length", str(n - start))
        cut = int(self.get_argument("cut", "-1"))
        if len(log) > int(self.get_argument("cuts", "1")):
            cut = -1
        await self._send(data[start:], record, cut, float(self.get_argument("delay", "0")))

    def _validators(self, version: int) -> dict[str, str]:
        kind = self.get_argument("validator", "etag")
        tag = f"v{version}-{self.path_args[1]}"
        if kind == "etag":
            return {"ETag": f'"{tag}"'}
        if kind == "weak":
            return {"ETag": f'W/"{tag}"'}
        if kind == "lastmod":
            return {"Last-Modified": f"Mon, 0{version + 1} Jan 2024 00:00:00 GMT"}
        return {}

    @staticmethod
    def _start(header: str | None, if_range: str | None, current: dict[str, str],
               n: int) -> int | None:
        """The offset a Range asks for, if If-Range still names this file."""
        if not header or not header.startswith("bytes=") or not header.endswith("-"):
            return None
        if if_range is not None and if_range not in current.values():
            return None
        if current.get("ETag", "").startswith("W/"):
            return None  # a weak ETag cannot satisfy If-Range (RFC 9110)
        start = int(header[len("bytes="):-1])
        return start

    async def _send(self, data: bytes, record: dict, cut: int, delay: float) -> None:
        step = 256 * 1024
        try:
            for i in range(0, len(data), step):
                piece = data[i:i + step]
                if 0 <= cut < record["sent"] + len(piece):
                    self.write(piece[:cut - record["sent"]])
                    await self.flush()
                    record["sent"] = cut
                    self.request.connection.stream.close()
                    return
                self.write(piece)
                record["sent"] += len(piece)  # counted as sent if written at all
                await self.flush()
                if delay:
                    await asyncio.sleep(delay)
        except StreamClosedError:
            pass


class PiecesHandler(_Base):
    """/pieces/<key>/<size>: a file served in ranges (``bytes=a-b`` and
    ``bytes=a-``) with If-Range, as a segmented download asks for it.
    Records per key every request (``PiecesHandler.requests[key]``: range,
    if_range, status, sent, peer) and the most ranged requests at once
    (``busiest[key]``).

    ?rate=N: bytes a second per connection; ?refuse=N: a 503 to a request
    when N are already running; ?change=N: from the N+1-th request on the
    file is another version (other bytes and ETag) and If-Range is ignored
    (?honest=1: honoured); ?noranges=1: a 200 to every ranged request;
    ?accept=0: no Accept-Ranges header; ?validator=etag|weak|none.

    As a mirror (#28): ?etag=X: the ETag is "X" (another server's ETag for
    the same bytes); ?fail=N: a 500 to every request after the first N (or
    once a test puts its key in ``PiecesHandler.down``); ?cut=N: the
    connection closed, unanswered, on every request after the first N;
    ?link=URL: a ``Link: <URL>; rel=duplicate`` header (RFC 6249; repeat
    it for more)."""

    requests: dict[str, list[dict]] = {}
    running: dict[str, int] = {}
    busiest: dict[str, int] = {}
    down: set[str] = set()

    async def get(self, key: str, size: str) -> None:
        log = self.requests.setdefault(key, [])
        n = int(size)
        version = 1 if len(log) >= int(self.get_argument("change", "1000000")) else 0
        record = {"range": self.request.headers.get("Range"),
                  "if_range": self.request.headers.get("If-Range"), "status": 200,
                  "sent": 0, "peer": self.request.remote_ip}
        log.append(record)
        fail = self.get_argument("fail", None)
        if (fail is not None and len(log) > int(fail)) or key in self.down:
            record["status"] = 500
            self.set_status(500)
            self.finish("broken mirror")
            return
        cut = self.get_argument("cut", None)
        if cut is not None and len(log) > int(cut):
            record["status"] = None
            self.request.connection.stream.close()
            return
        for link in self.get_arguments("link"):
            self.add_header("Link", f"<{link}>; rel=duplicate")
        refuse = int(self.get_argument("refuse", "0"))
        if refuse and self.running.get(key, 0) >= refuse:
            record["status"] = 503
            self.set_status(503)
            self.set_header("Retry-After", "1")
            self.finish("busy")
            return
        kind = self.get_argument("validator", "etag")
        tag = self.get_argument("etag", f"p{version}-{n}")
        etag = {"etag": f'"{tag}"', "weak": f'W/"{tag}"'}.get(kind)
        if etag:
            self.set_header("ETag", etag)
        if self.get_argument("accept", "1") == "1":
            self.set_header("Accept-Ranges", "bytes")
        first, last = 0, n - 1
        wanted = record["range"]
        honoured = not self.get_argument("noranges", None) and wanted is not None and (
            record["if_range"] is None or record["if_range"] == etag
            or (version and not self.get_argument("honest", None)))
        if honoured:
            spec = wanted.removeprefix("bytes=")
            a, _, b = spec.partition("-")
            first, last = int(a), (int(b) if b else n - 1)
            record["status"] = 206
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {first}-{last}/{n}")
        self.set_header("Content-Length", str(last - first + 1))
        data = body(n, self.seed() + version)[first:last + 1]
        rate = float(self.get_argument("rate", "0"))
        counted = record["range"] is not None
        self.running[key] = self.running.get(key, 0) + counted
        self.busiest[key] = max(self.busiest.get(key, 0), self.running[key])
        try:
            step = 64 * 1024
            started = time.monotonic()
            for i in range(0, len(data), step):
                self.write(data[i:i + step])
                if i + step >= len(data):
                    # Done sending: the client may ask for its next piece
                    # before this flush returns; count it ended now.
                    self.running[key] -= counted
                    counted = False
                await self.flush()
                record["sent"] += min(step, len(data) - i)
                if rate:
                    ahead = record["sent"] / rate - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            self.finish()
        except StreamClosedError:
            pass
        finally:
            self.running[key] -= counted


class VersionedHandler(_Base):
    """/versioned/<key>/<size>: a file whose version a test sets
    (``VersionedHandler.versions[key]``), with validators per version, and
    conditional requests answered as a server does (304 Not Modified).
    Records each request: ``VersionedHandler.seen[key]`` holds (status,
    If-None-Match, If-Modified-Since, body bytes sent). ?validator=etag
    (the default) | weak | lastmod; ?bare304=1: a 304 without validators
    (?lie304=1: whatever the request's validators name)."""

    versions: dict[str, int] = {}
    seen: dict[str, list[tuple[int, str | None, str | None, int]]] = {}

    def compute_etag(self) -> None:
        return None  # this handler answers conditionals itself

    def get(self, key: str, size: str) -> None:
        version = self.versions.get(key, 0)
        kind = self.get_argument("validator", "etag")
        inm = self.request.headers.get("If-None-Match")
        ims = self.request.headers.get("If-Modified-Since")
        etag = {"etag": f'"{key}-v{version}"', "weak": f'W/"{key}-v{version}"'}.get(kind)
        modified = f"Mon, 0{version + 1} Jan 2024 00:00:00 GMT" if kind == "lastmod" else None
        if etag:
            self.set_header("ETag", etag)
        if modified:
            self.set_header("Last-Modified", modified)
        unchanged = ((etag is not None and inm is not None
                      and inm.removeprefix("W/") == etag.removeprefix("W/"))
                     or (modified is not None and ims == modified))
        if unchanged or (self.get_argument("lie304", None) and (inm or ims)):
            self.seen.setdefault(key, []).append((304, inm, ims, 0))
            if self.get_argument("bare304", None):
                self.clear_header("ETag")
                self.clear_header("Last-Modified")
            self.set_status(304)
            self.finish()
            return
        data = body(int(size), self.seed() + version)
        self.seen.setdefault(key, []).append((200, inm, ims, len(data)))
        self.set_header("Content-Length", str(len(data)))
        self.finish(data)


def served(key: str) -> int:
    """Body bytes RangeHandler sent for ``key``, over all requests."""
    return sum(r["sent"] for r in RangeHandler.requests.get(key, []))
class HookHandler(web.RequestHandler):
    """/hook/<key>?fail=N&code=C: a webhook receiver that records every
    post (headers and body) per key and answers C (default 500) to the
    first N of them, then 204; ?answer=big: then 200 with 128 MiB of body
    (over Tornado's default max_body_size),
    ?answer=endless: 200 and a body that never ends."""

    received: dict[str, list[dict]] = {}

    async def post(self, key: str) -> None:
        posts = self.received.setdefault(key, [])
        posts.append({"headers": dict(self.request.headers), "body": self.request.body,
                      "peer": self.request.remote_ip, "at": time.time()})
        if len(posts) <= int(self.get_argument("fail", "0")):
            self.set_status(int(self.get_argument("code", "500")))
            self.finish("not now")
            return
        answer = self.get_argument("answer", None)
        try:
            if answer == "big":
                self.set_header("Content-Length", str(128 * 2**20))
                for _ in range(512):
                    self.write(b"x" * 2**18)
                    await self.flush()
                self.finish()
                return
            if answer == "endless":
                while True:
                    self.write(b"still here\n")
                    await self.flush()
                    await asyncio.sleep(0.2)
        except StreamClosedError:
            return
        self.set_status(204)
        self.finish()


class HookServer(ThreadedServer):
    """A webhook receiver (HookHandler) on its own thread."""

    def _run(self) -> None:
        async def main() -> None:
            sockets = bind_sockets(0, self.host, family=socket.AF_INET)
            self.port = sockets[0].getsockname()[1]
            server = HTTPServer(web.Application([(r"/hook/([\w-]+)", HookHandler)]))
            server.add_sockets(sockets)
            self._ready.set()
            await asyncio.Event().wait()

        asyncio.run(main())


def serve(host: str = "0.0.0.0", port: int = 8080) -> None:
    """The file server in the foreground: the `files` container of
    tests/docker-compose.test.yml runs ``python /tests/fileserver.py``.
    As a container's PID 1 it must exit on SIGTERM by itself."""
    import signal
    import sys
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    async def main() -> None:
        server = HTTPServer(make_app())
        server.add_sockets(bind_sockets(port, host, family=socket.AF_INET))
        await asyncio.Event().wait()

    asyncio.run(main())


if __name__ == "__main__":
    import sys
    serve(sys.argv[1] if len(sys.argv) > 1 else "0.0.0.0",
          int(sys.argv[2]) if len(sys.argv) > 2 else 8080)
