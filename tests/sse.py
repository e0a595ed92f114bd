"""A small server-sent events client for the tests: reads a stream line by
line over a real connection and parses its events and comments."""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field


@dataclass
class Event:
    name: str
    id: str | None
    data: dict
    at: float = field(default_factory=time.monotonic)


class Stream:
    def __init__(self, base: str, path: str, last_event_id: str | None = None,
                 timeout: float = 30):
        host, port = base.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.conn.request("GET", path, headers=headers)
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.comments: list[str] = []
        self.retry: int | None = None

    def json(self) -> dict:
        return json.loads(self.response.read())

    def next(self) -> Event | None:
        """The next event, or None when the server closed the stream."""
        fields: dict[str, str] = {}
        while True:
            raw = self.response.readline()
            if not raw:
                return None
            line = raw.decode("utf-8").rstrip("\n")
            if line == "":
                if "data" in fields:
                    return Event(fields.get("event", "message"), fields.get("id"),
                                 json.loads(fields["data"]))
                continue
            if line.startswith(":"):
                self.comments.append(line)
                continue
            name, _, value = line.partition(": ")
            if name == "retry":
                self.retry = int(value)
            else:
                fields[name] = value

    def all(self) -> list[Event]:
        events = []
        while (event := self.next()) is not None:
            events.append(event)
        return events

    def close(self) -> None:
        self.conn.close()
