"""Which download a task's URL gets, by scheme (thumbor's loader is the
model): HTTP(S) through ``download.Download``, ftp:// and ftps:// through
``ftp.FtpDownload``, and the FTP hosts known to serve the same paths over
HTTPS (FTP_PREFER_HTTPS) over HTTPS, which is faster and resumes through
the HTTP code, falling back to FTP when the HTTPS copy cannot be had.
Every kind has the face ``Transfer`` describes: the worker and
``runtime.outcomes`` need nothing else."""

from __future__ import annotations

import urllib.parse
from concurrent.futures import Executor
from typing import Any, Protocol

from tornado.httpclient import AsyncHTTPClient

from service.config import Config
from service.fetch.checkpoint import Checkpoint
from service.fetch.download import Download, Fetched
from service.fetch.errors import FetchError, Interrupted
from service.fetch.ftp import DEFAULT_PORTS, FtpDownload
from service.fetch.mirrors import Wanted
from service.fetch.segments import HostSlots
from service.model.same_file import KnownFile

# A permanent failure of the HTTPS copy that FTP may not share.
_FALL_BACK = {"http_status", "dns", "tls", "redirects", "connection", "bad_response"}


class Transfer(Protocol):
    """What the worker drives: run it, abort it, read its progress."""

    @property
    def url(self) -> str: ...
    @property
    def bytes_done(self) -> int: ...
    @property
    def bytes_total(self) -> int | None: ...
    @property
    def fetched(self) -> int: ...
    @property
    def last_progress(self) -> float: ...

    async def run(self) -> Fetched: ...
    def abort(self, error: FetchError | Interrupted) -> None: ...
    def checkpoint(self, due: bool = False) -> Checkpoint | None: ...
    def progress(self) -> dict[str, Any]: ...


def make_download(url: str, config: Config, client: AsyncHTTPClient,
                  executor: Executor | None, algorithms: list[str] | None = None,
                  checkpoint: Checkpoint | None = None,
                  revalidate: KnownFile | None = None, connections: int | None = None,
                  slots: HostSlots | None = None, wanted: Wanted | None = None) -> Transfer:
    """``wanted``: the task's mirrors and what checks them (HTTP only: an
    FTP file, or its HTTPS copy, has no mirrors)."""
    if urllib.parse.urlsplit(url).scheme.lower() not in DEFAULT_PORTS:
        return Download(url, config, client, executor, algorithms, checkpoint,
                        revalidate=revalidate, connections=connections, slots=slots,
                        wanted=wanted)
    ftp = FtpDownload(url, config, executor, algorithms, checkpoint, revalidate)
    alternative = https_alternative(url, config)
    if alternative is None:
        return ftp
    ours = checkpoint if checkpoint and not checkpoint.validator.startswith("ftp ") else None
    return PreferHttps(Download(alternative, config, client, executor, algorithms, ours,
                                revalidate=revalidate, connections=connections, slots=slots),
                       ftp)


def https_alternative(url: str, config: Config) -> str | None:
    """The HTTPS URL FTP_PREFER_HTTPS maps an ftp:// URL to, or None."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        return None
    host = (parts.hostname or "").lower()
    # An entry names a host (its default port) or a host:port.
    key = host if parts.port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{parts.port}"
    bases = dict(item.split("=", 1) for item in config.ftp_prefer_https)
    base = {name.strip().lower(): b.strip() for name, b in bases.items()}.get(key)
    if not base:
        return None
    return base.rstrip("/") + "/" + parts.path.lstrip("/")


class PreferHttps:
    """An FTP file fetched from its HTTPS copy; from FTP after all if the
    copy fails for good (a 404, a bad certificate...). ``progress`` names
    the URL actually fetched (``fetched_url`` in /tasks/<id>)."""

    def __init__(self, https: Download, ftp: FtpDownload):
        self.https, self.ftp = https, ftp
        self.current: Download | FtpDownload = https
        self._fell_back: str | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        return self.ftp.url

    @property
    def bytes_done(self) -> int:
        return self.current.bytes_done

    @property
    def bytes_total(self) -> int | None:
        return self.current.bytes_total

    @property
    def fetched(self) -> int:
        return self.https.fetched + self.ftp.fetched

    @property
    def last_progress(self) -> float:
        return self.current.last_progress

    async def run(self) -> Fetched:
        try:
            return await self.https.run()
        except FetchError as exc:
            if exc.transient or exc.code not in _FALL_BACK or self._stopped:
                raise
            self._fell_back = f"{exc.message}; fetched over FTP instead"
        self.current = self.ftp
        return await self.ftp.run()

    def abort(self, error: FetchError | Interrupted) -> None:
        self._stopped = True
        self.current.abort(error)

    def checkpoint(self, due: bool = False) -> Checkpoint | None:
        return self.current.checkpoint(due)

    def progress(self) -> dict[str, Any]:
        progress = {**self.current.progress(), "fetched_url": self.current.url,
                    "fetched": self.fetched}
        if self._fell_back:
            progress["note"] = "; ".join(n for n in (self._fell_back, progress["note"]) if n)
        return progress
