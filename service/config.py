"""One typed configuration object, built from CLI flags and environment.

Every setting has an environment variable; most also have a flag. The flag
wins over the environment, the environment over the default. ``run.py
--help`` is generated from the table below, so it cannot drift from it.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}


def parse_size(text: str) -> int:
    """'10 GiB', '512MiB', '1000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (try 10GiB, 500MB, 1048576)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_seconds(text: str) -> float:
    """'30', '30s', '1.5', '2m' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r} (try 30, 30s, 2m)")
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return float(m.group(1)) * factor


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r} (use 1 or 0)")


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in str(text).split(",") if p.strip())


def human_size(n: int) -> str:
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} bytes"


def _field(env: str, default: Any, parse: Callable[[str], Any], help: str,
           flag: str | None = None, short: str | None = None, secret: bool = False):
    return dataclasses.field(default=default, metadata={
        "env": env, "parse": parse, "help": help, "flag": flag, "short": short,
        "secret": secret})


@dataclasses.dataclass(frozen=True)
class Config:
    host: str = _field("HOST", "127.0.0.1", str, "address the API listens on", "--host")
    port: int = _field("PORT", 8000, int, "port the API listens on", "--port")
    workers: int = _field("WORKERS", os.cpu_count() or 1, int,
                          "worker processes started by the 'all' role", "--workers")
    concurrency: int = _field("WORKER_CONCURRENCY", 16, int,
                              "downloads at once per worker process", "--concurrency")
    mongodb_uri: str | None = _field("MONGODB_URI", None, str,
                                     "MongoDB URI; unset starts the embedded SecantusDB",
                                     "--mongodb-uri", secret=True)
    data_dir: str = _field("DATA_DIR", "./data", str,
                           "where the embedded database keeps its files", "--data-dir")
    embedded_db_patches: bool = _field("EMBEDDED_DB_PATCHES", True, parse_bool,
                                       "the embedded SecantusDB's write-path fixes "
                                       "(runtime/embedded_patches.py); 0 runs it as released")
    smtp_host: str | None = _field("SMTP_HOST", None, str, "SMTP server; unset turns mail off")
    smtp_port: int = _field("SMTP_PORT", 587, int, "SMTP port")
    smtp_user: str | None = _field("SMTP_USER", None, str, "SMTP login")
    smtp_password: str | None = _field("SMTP_PASSWORD", None, str, "SMTP password", secret=True)
    smtp_tls: str = _field("SMTP_TLS", "starttls", str, "none, starttls or ssl")
    smtp_timeout: float = _field("SMTP_TIMEOUT", 30.0, parse_seconds, "SMTP socket timeout")
    smtp_ca_file: str | None = _field("SMTP_CA_FILE", None, str,
                                      "CA bundle to verify the SMTP server (default: system)")
    mail_from: str = _field("MAIL_FROM", "md5-light@localhost", str, "sender address")
    mail_max_attempts: int = _field("MAIL_MAX_ATTEMPTS", 6, int,
                                    "delivery attempts before a notification fails")
    mail_retry_base: float = _field("MAIL_RETRY_BASE", 15.0, parse_seconds,
                                    "first mail retry delay; doubles each attempt")
    allow_private_urls: bool = _field("ALLOW_PRIVATE_URLS", False, parse_bool,
                                      "allow fetching from private/loopback addresses",
                                      "--allow-private-urls")
    allow_networks: tuple = _field("ALLOW_NETWORKS", (), parse_list,
                                   "comma-separated CIDRs allowed despite the "
                                   "private-address block")
    resolve: tuple = _field("RESOLVE", (), parse_list,
                            "comma-separated HOST=ADDRESS overrides, like curl --resolve")
    max_file_size: int = _field("MAX_FILE_SIZE", 10 * 1024**3, parse_size, "largest file hashed")
    connect_timeout: float = _field("CONNECT_TIMEOUT", 10.0, parse_seconds,
                                    "time to resolve and connect")
    idle_timeout: float = _field("IDLE_TIMEOUT", 30.0, parse_seconds,
                                 "a download fails after this long without progress")
    min_speed: int = _field("MIN_SPEED", 1024, parse_size,
                            "bytes per IDLE_TIMEOUT below which a download counts as stalled")
    max_redirects: int = _field("MAX_REDIRECTS", 5, int, "redirects followed")
    max_attempts: int = _field("MAX_ATTEMPTS", 3, int, "tries per task before it fails")
    retry_base: float = _field("RETRY_BASE", 2.0, parse_seconds,
                               "first retry delay of a download; doubles each attempt")
    lease_seconds: float = _field("LEASE_SECONDS", 30.0, parse_seconds,
                                  "a task whose worker is silent this long is claimed again")
    poll_interval: float = _field("POLL_INTERVAL", 1.0, parse_seconds,
                                  "how often idle workers look for work")
    handoff: bool = _field("HANDOFF", True, parse_bool,
                           "the 'all' role's API hands tasks to its workers through their "
                           "pipes (assigned at insert when one has room) instead of each "
                           "claim scanning the database")
    drain_seconds: float = _field("DRAIN_SECONDS", 10.0, parse_seconds,
                                  "grace period for running downloads on shutdown")
    coalesce: bool = _field("COALESCE", True, parse_bool,
                            "submits of a file already queued or running share its download")
    idempotency_ttl: float = _field("IDEMPOTENCY_TTL", 86400.0, parse_seconds,
                                    "how long an Idempotency-Key maps to its task")
    log_level: str = _field("LOG_LEVEL", "INFO", str, "DEBUG, INFO, WARNING or ERROR",
                            "--log-level")
    log_format: str = _field("LOG_FORMAT", "text", str, "text, or json for one JSON object a line",
                             "--log-format")
    task_ttl_days: float | None = _field("TASK_TTL_DAYS", None, float,
                                         "delete finished tasks, and files' records, after "
                                         "this many days (unset: keep forever)")
    metrics_db_interval: float = _field("METRICS_DB_INTERVAL", 15.0, parse_seconds,
                                        "/metrics reads the database at most this often "
                                        "per API process")
    max_pending_per_client: int = _field("MAX_PENDING_PER_CLIENT", 1000, int,
                                         "unfinished (queued or running) tasks one client may "
                                         "have; more is refused with 429 (0: no limit)")
    max_queued: int = _field("MAX_QUEUED", 100_000, int,
                             "queued tasks in all; more is refused with 503 (0: no limit)")
    client_ip_header: str | None = _field("CLIENT_IP_HEADER", None, str,
                                          "header in which a trusted proxy appends the client's "
                                          "address, e.g. X-Forwarded-For (its right-most entry "
                                          "is used); unset: the connection's address")
    require_api_key: bool = _field("REQUIRE_API_KEY", False, parse_bool,
                                   "refuse requests without an API key (run.py keys create); "
                                   "off: anyone may submit, and a key only names its tasks",
                                   "--require-api-key")
    loopback_operator: bool = _field("LOOPBACK_OPERATOR", True, parse_bool,
                                     "until the first API key is made, a request from "
                                     "loopback (with CLIENT_IP_HEADER: whose header names "
                                     "loopback) lists every task; 0 behind a reverse proxy "
                                     "on the same host that sets no such header")
    max_connections_per_client: int = _field("MAX_CONNECTIONS_PER_CLIENT", 1024, int,
                                             "open connections one remote address may hold; "
                                             "more are closed at once (0: no limit)")
    # A checkpoint rides on the lease renewal (once a second, no extra
    # round trip) whenever this many new bytes were hashed since the last
    # one: a crash then re-fetches at most about this much plus a second
    # of transfer, while a slow download does not rewrite its hash states
    # every second for a few kilobytes.
    checkpoint_interval: int = _field("CHECKPOINT_INTERVAL", 16 * 1024**2, parse_size,
                                      "a long download is checkpointed (for a retry to "
                                      "resume) each time this many more bytes are hashed")
    # Resumable hashing (rehashes) holds the GIL and is slower than hashlib
    # (docs/design.md, "Checkpoints and resuming"): it pays only where
    # losing the download would cost more than that. 1 GiB is ten seconds
    # at 100 MB/s, about what DRAIN_SECONDS already grants a deploy.
    resumable_min_size: int = _field("RESUMABLE_MIN_SIZE", 1024**3, parse_size,
                                     "downloads larger than this are checkpointed and "
                                     "resume where they stopped; smaller ones start over")
    # Segmented downloads (fetch/segments.py): several ranged connections
    # to one server, hashed in order. Below SEGMENT_MIN_SIZE one connection
    # ends within a few seconds even at the 16 MB/s a far server allows,
    # and a probe and extra connections would cost more than they win.
    segment_min_size: int = _field("SEGMENT_MIN_SIZE", 64 * 1024**2, parse_size,
                                   "files at least this large are fetched over several "
                                   "ranged connections when the server allows it")
    connections_per_download: int = _field("CONNECTIONS_PER_DOWNLOAD", 4, int,
                                           "ranged connections per segmented download (the "
                                           "'connections' submit parameter changes it)")
    max_connections: int = _field("MAX_CONNECTIONS", 16, int,
                                  "the most 'connections' a submit may ask for")
    max_connections_per_host: int = _field("MAX_CONNECTIONS_PER_HOST", 8, int,
                                           "extra ranged connections one worker opens to one "
                                           "host across its downloads (the first of each "
                                           "download is not counted)")
    # A fast local server is faster over one connection hashed by hashlib
    # on threads (1 GiB: 3.4 s) than as pieces hashed inline (6 s).
    segment_max_rate: int = _field("SEGMENT_MAX_RATE", 80_000_000, parse_size,
                                   "bytes a second: a big download whose first connection "
                                   "is slower goes on over several connections and resumes "
                                   "at any size; a faster one keeps one connection")
    segment_window: int = _field("SEGMENT_WINDOW", 64 * 1024**2, parse_size,
                                 "bytes a segmented download may hold ahead of its hashing")
    ftp_prefer_https: tuple = _field(
        "FTP_PREFER_HTTPS", ("ftp.sra.ebi.ac.uk=https://ftp.sra.ebi.ac.uk",
                             "ftp.ncbi.nlm.nih.gov=https://ftp.ncbi.nlm.nih.gov"), parse_list,
        "comma-separated FTPHOST=HTTPS_BASE: ftp:// URLs of these hosts are fetched from "
        "the same path under HTTPS_BASE (faster, resumable), FTP if that fails; empty: "
        "always FTP")
    ena_portal_url: str = _field("ENA_PORTAL_URL", "https://www.ebi.ac.uk/ena/portal/api", str,
                                 "ENA's portal API, asked for the files of an accession "
                                 "(POST /manifests?ena=)")
    webhook_secret: str | None = _field("WEBHOOK_SECRET", None, str,
                                        "signs webhooks (Standard Webhooks): whsec_ and the "
                                        "base64 of 24 to 64 random bytes; unset: callback_url "
                                        "is refused", secret=True)
    webhook_max_attempts: int = _field("WEBHOOK_MAX_ATTEMPTS", 6, int,
                                       "delivery attempts before a webhook fails")
    webhook_retry_base: float = _field("WEBHOOK_RETRY_BASE", 15.0, parse_seconds,
                                       "first webhook retry delay; doubles each attempt")
    webhook_timeout: float = _field("WEBHOOK_TIMEOUT", 10.0, parse_seconds,
                                    "time a webhook receiver has to answer")
    max_streams_per_client: int = _field("MAX_STREAMS_PER_CLIENT", 20, int,
                                         "event streams (/tasks/<id>/events) one client may "
                                         "hold open per API process; more get 429")
    sse_keepalive: float = _field("SSE_KEEPALIVE", 15.0, parse_seconds,
                                  "a comment is sent on an idle event stream this often")

    @property
    def embedded(self) -> bool:
        return not self.mongodb_uri

    @property
    def mail_enabled(self) -> bool:
        return bool(self.smtp_host)

    def describe(self) -> str:
        """The settings, secrets hidden, for the start-up log."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] and value:
                value = "***"
            parts.append(f"{f.name}={value}")
        return " ".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every setting that has one; defaults stay None so that
    the environment can fill in what the command line did not say."""
    for f in dataclasses.fields(Config):
        meta = f.metadata
        if not meta["flag"]:
            continue
        names = [meta["flag"]] + ([meta["short"]] if meta["short"] else [])
        default = "unset" if f.default is None else f.default
        if f.type in ("bool",) or isinstance(f.default, bool):
            parser.add_argument(*names, dest=f.name, action="store_const", const="1",
                                default=None,
                                help=f"{meta['help']} (env {meta['env']}, default {default})")
        else:
            parser.add_argument(*names, dest=f.name, default=None, metavar=meta["env"],
                                help=f"{meta['help']} (env {meta['env']}, default {default})")
    parser.add_argument("-v", "--verbose", dest="log_level", action="store_const",
                        const="DEBUG", help="debug logging (same as --log-level DEBUG)")


def env_help() -> str:
    lines = ["environment variables (a flag, where there is one, wins):"]
    for f in dataclasses.fields(Config):
        meta = f.metadata
        default = "unset" if f.default is None else f.default
        if isinstance(default, int) and not isinstance(default, bool) and default > 1024**2:
            default = human_size(default)
        if f.name == "workers":
            default = "CPU count"
        lines.append(f"  {meta['env']:<20} {meta['help']} (default {default})")
    return "\n".join(lines)


def load(args: argparse.Namespace | None = None,
         environ: Mapping[str, str] | None = None) -> Config:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    errors = []
    for f in dataclasses.fields(Config):
        meta = f.metadata
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None:
            raw = environ.get(meta["env"])
        if raw is None or (raw == "" and f.default is None):
            continue
        try:
            values[f.name] = meta["parse"](raw)
        except ValueError as exc:
            errors.append(f"{meta['env']}: {exc}")
    if errors:
        raise SystemExit("configuration error: " + "; ".join(errors))
    config = Config(**values)
    _check(config)
    return config


def _check(config: Config) -> None:
    problems = []
    if config.smtp_tls not in ("none", "starttls", "ssl"):
        problems.append("SMTP_TLS must be none, starttls or ssl")
    for name in ("workers", "concurrency", "max_attempts", "max_redirects"):
        if getattr(config, name) < (0 if name in ("workers", "max_redirects") else 1):
            problems.append(f"{name} is out of range")
    if config.log_format not in ("text", "json"):
        problems.append("LOG_FORMAT must be text or json")
    if config.task_ttl_days is not None and config.task_ttl_days <= 0:
        problems.append("TASK_TTL_DAYS must be positive")
    if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append("LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
    if not 1 <= config.connections_per_download <= config.max_connections:
        problems.append("CONNECTIONS_PER_DOWNLOAD must be from 1 to MAX_CONNECTIONS")
    if config.max_connections_per_host < 0 or config.segment_window < 2**20:
        problems.append("MAX_CONNECTIONS_PER_HOST must be 0 or more, SEGMENT_WINDOW 1 MiB or "
                        "more")
    if config.checkpoint_interval < 1:
        problems.append("CHECKPOINT_INTERVAL must be at least 1 byte")
    for name in ("max_pending_per_client", "max_queued", "max_connections_per_client"):
        if getattr(config, name) < 0:
            problems.append(f"{name.upper()} must be 0 (no limit) or more")
    if config.client_ip_header is not None and not re.fullmatch(
            r"[A-Za-z0-9-]{1,64}", config.client_ip_header):
        problems.append("CLIENT_IP_HEADER must be a header name, e.g. X-Forwarded-For")
    if config.webhook_secret is not None and webhook_key(config.webhook_secret) is None:
        problems.append("WEBHOOK_SECRET must be whsec_ followed by the base64 of 24 to 64 "
                        "random bytes, e.g. whsec_$(head -c 32 /dev/urandom | base64)")
    if config.max_streams_per_client < 1 or config.webhook_max_attempts < 1:
        problems.append("MAX_STREAMS_PER_CLIENT and WEBHOOK_MAX_ATTEMPTS must be 1 or more")
    if config.sse_keepalive <= 0:
        problems.append("SSE_KEEPALIVE must be positive")
    for item in config.ftp_prefer_https:
        host, _, base = item.partition("=")
        if not host.strip() or not base.strip().lower().startswith(("http://", "https://")):
            problems.append(f"FTP_PREFER_HTTPS entry {item!r} is not FTPHOST=https://...")
    if not config.ena_portal_url.lower().startswith(("http://", "https://")):
        problems.append("ENA_PORTAL_URL must be an http:// or https:// URL")
    for item in config.resolve:
        if "=" not in item:
            problems.append(f"RESOLVE entry {item!r} is not HOST=ADDRESS")
    if problems:
        raise SystemExit("configuration error: " + "; ".join(problems))


def webhook_key(secret: str) -> bytes | None:
    """The HMAC key of a Standard Webhooks secret (``whsec_<base64>``),
    or None if it is not one."""
    prefix, _, encoded = secret.partition("_")
    if prefix != "whsec" or not encoded:
        return None
    try:
        key = base64.b64decode(encoded, validate=True)
    except ValueError:
        return None
    return key if 24 <= len(key) <= 64 else None


def to_environ(config: Config) -> dict[str, str]:
    """The environment that makes a child process load this same config."""
    env = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        if isinstance(value, bool):
            value = "1" if value else "0"
        elif isinstance(value, tuple):
            value = ",".join(value)
        env[f.metadata["env"]] = str(value)
    return env


__all__: Sequence[str] = ["Config", "load", "add_arguments", "env_help", "to_environ",
                          "parse_size", "parse_seconds", "human_size"]
