"""A real FTP server (pyftpdlib) on 127.0.0.1 in a daemon thread, with the
misbehaviours the FTP tests need: a PASV answer naming another address,
no EPSV, a transfer cut short, a file that changes while it is read, a
transient 425, implicit TLS. It records the commands it was sent."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

from fileserver import body
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.filesystems import AbstractedFS
from pyftpdlib.handlers import FTPHandler, ThrottledDTPHandler, TLS_FTPHandler
from pyftpdlib.ioloop import IOLoop
from pyftpdlib.servers import FTPServer

# What each server was asked: (handler name, command, argument).
COMMANDS: list[tuple[str, str, str]] = []
# Transfers the server saw aborted by the client, and when.
ABORTED: list[tuple[str, float]] = []
# Per file name: how to misbehave on its next RETR.
#   ("cut", n)           send the first n bytes, then end the transfer (226)
#   ("cut_change", n)    the same, and replace the file (new bytes and mtime)
#   ("change_at", n)     after n bytes, replace the file on disk (the
#                        transfer goes on with the old bytes)
TRICKS: dict[str, tuple[str, int]] = {}


def replace(path: Path, seed: int) -> None:
    """The same file name, the same size, other bytes, a later mtime."""
    size = path.stat().st_size
    tmp = path.with_suffix(".new")
    tmp.write_bytes(body(size, seed))
    later = path.stat().st_mtime + 120
    os.utime(tmp, (later, later))
    os.replace(tmp, path)


class _Tricked(io.RawIOBase):
    def __init__(self, fd, trick: tuple[str, int]):
        self.fd, (self.kind, self.at) = fd, trick
        self.name = fd.name
        self.sent = 0

    def read(self, n: int = -1) -> bytes:
        if self.kind.startswith("cut"):
            n = min(n, self.at - self.sent)
            if n <= 0:
                if self.kind == "cut_change":
                    self.kind = "done"
                    replace(Path(self.fd.name), seed=99)
                return b""
        data = self.fd.read(n)
        self.sent += len(data)
        if self.kind == "change_at" and self.sent >= self.at:
            self.kind = "done"
            replace(Path(self.fd.name), seed=99)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self.fd.seek(offset, whence)
        self.sent = position
        return position

    def close(self) -> None:
        self.fd.close()
        super().close()

    @property
    def closed(self) -> bool:  # type: ignore[override]
        return self.fd.closed


class TrickFS(AbstractedFS):
    def open(self, filename, mode):
        fd = super().open(filename, mode)
        trick = TRICKS.pop(os.path.basename(filename), None)
        return _Tricked(fd, trick) if trick else fd


class Recording(FTPHandler):
    abstracted_fs = TrickFS
    dtp_handler = ThrottledDTPHandler

    def pre_process_command(self, line, cmd, arg):
        COMMANDS.append((type(self).__name__, cmd, arg or ""))
        return super().pre_process_command(line, cmd, arg)

    def on_incomplete_file_sent(self, file):
        ABORTED.append((os.path.basename(file), time.monotonic()))


class NoEpsv(Recording):
    """Answers PASV only (some old servers)."""

    def ftp_EPSV(self, line):
        self.respond("502 EPSV not implemented.")


class Bounce(NoEpsv):
    """PASV names another host than itself: the FTP bounce."""

    masquerade_address = "10.1.2.3"


class Busy(Recording):
    """425 to every RETR: a transient refusal."""

    def ftp_RETR(self, file):
        self.respond("425 Can't open data connection.")


class ImplicitTLS(TLS_FTPHandler):
    """ftps://: TLS from the first byte, the data connection encrypted."""

    abstracted_fs = TrickFS
    tls_data_required = True

    def pre_process_command(self, line, cmd, arg):
        COMMANDS.append((type(self).__name__, cmd, arg or ""))
        return super().pre_process_command(line, cmd, arg)

    def handle(self):
        self.secure_connection(self.ssl_context)

    def handle_ssl_established(self):
        TLS_FTPHandler.handle(self)  # the greeting, over TLS


class FtpServer:
    def __init__(self, root: Path, handler: type = Recording, certfile: Path | None = None,
                 keyfile: Path | None = None, write_limit: int = 0):
        self.root = root
        authorizer = DummyAuthorizer()
        authorizer.add_anonymous(str(root))
        # A class of its own per server: pyftpdlib configures handler classes.
        attrs: dict = {"authorizer": authorizer, "passive_ports": None}
        if certfile is not None:
            attrs.update(certfile=str(certfile), keyfile=str(keyfile), ssl_context=None)
        self.handler = type(handler.__name__, (handler,), attrs)
        if write_limit:
            self.handler.dtp_handler = type("Throttled", (ThrottledDTPHandler,),
                                            {"write_limit": write_limit})
        # An IOLoop of its own: pyftpdlib's default one is shared, and
        # close_all() would stop every server on it.
        self.server = FTPServer(("127.0.0.1", 0), self.handler, ioloop=IOLoop())
        self.port = self.server.address[1]
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"timeout": 0.05}, daemon=True)

    def start(self) -> FtpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.close_all()

    def url(self, name: str, host: str = "127.0.0.1", scheme: str = "ftp") -> str:
        return f"{scheme}://{host}:{self.port}/{name}"

    def put(self, name: str, size: int, seed: int = 0) -> Path:
        path = self.root / name
        path.write_bytes(body(size, seed))
        return path
