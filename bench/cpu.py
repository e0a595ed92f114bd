"""CPU seconds spent by process trees during a run, read from /proc.

Wall time says how long a burst took; on two shared cores it cannot say
who spent them. These figures can: each system's processes (with all
their descendants), the load generator and nginx, measured over the same
interval."""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


def _seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0  # ended between the listing and the read
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


class CpuMeter:
    """``with CpuMeter({"database": [pid], ...}) as m: ...`` then ``m.used``:
    CPU seconds per group over the block. Trees are listed at the start
    (the systems measured keep their processes for the whole run)."""

    def __init__(self, groups: dict[str, list[int]]):
        self.groups = {name: [p for pid in pids for p in _tree(pid)]
                       for name, pids in groups.items()}
        self.used: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        reading = {name: sum(_seconds(p) for p in pids) for name, pids in self.groups.items()}
        times = os.times()
        reading["load generator"] = times.user + times.system
        return reading

    def __enter__(self) -> CpuMeter:
        self._start = self._read()
        return self

    def __exit__(self, *exc) -> None:
        end = self._read()
        self.used = {name: end[name] - self._start[name] for name in end}

    def summary(self) -> str:
        return ", ".join(f"{name} {s:.1f}" for name, s in self.used.items())
