"""Logging set-up: text for people, JSON lines for log shippers."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
import threading

from service.redact import scrub_urls

_TASK_ID = re.compile(r"\btask ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


class TextFormatter(logging.Formatter):
    """Every line, whoever logs it (Tornado, asyncio, a traceback), with URLs
    cut to scheme, host and path: query strings carry tokens and emails."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub_urls(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname, "logger": record.name,
            "message": scrub_urls(record.getMessage()),
        }
        match = _TASK_ID.search(doc["message"])
        if match:
            doc["task"] = match.group(1)
        if record.exc_info:
            doc["exception"] = scrub_urls(self.formatException(record.exc_info))
        if record.stack_info:
            doc["stack"] = scrub_urls(self.formatStack(record.stack_info))
        return json.dumps(doc, ensure_ascii=False)


def setup(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Successful requests are routine; 4xx and 5xx are still logged.
    logging.getLogger("tornado.access").setLevel(
        logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING)
    # PyMongo's debug logs print whole commands: task documents with their
    # email addresses, and URLs inside JSON where no pattern can be sure to
    # find them all.
    logging.getLogger("pymongo").setLevel(max(root.level, logging.INFO))
    _route_uncaught_exceptions()


def _route_uncaught_exceptions() -> None:
    """Tracebacks that would go straight to stderr go through the log
    handler instead, so they are scrubbed like every other line."""
    log = logging.getLogger("md5light")

    def excepthook(typ, value, tb) -> None:
        if issubclass(typ, KeyboardInterrupt):
            sys.__excepthook__(typ, value, tb)
            return
        log.critical("uncaught exception", exc_info=(typ, value, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        log.error("uncaught exception in thread %s",
                  args.thread.name if args.thread else "?",
                  exc_info=args.exc_value or True)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
