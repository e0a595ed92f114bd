"""Logging set-up: text for people, JSON lines for log shippers."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re

_TASK_ID = re.compile(r"\btask ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname, "logger": record.name,
            "message": record.getMessage(),
        }
        match = _TASK_ID.search(doc["message"])
        if match:
            doc["task"] = match.group(1)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Successful requests are routine; 4xx and 5xx are still logged.
    logging.getLogger("tornado.access").setLevel(
        logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING)
