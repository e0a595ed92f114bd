#!/usr/bin/env python3
"""What checking an object store's claims costs (issue #26), each a ratio
measured in one run against the same 1 GiB file served without claims,
md5 alone requested:

    9. the file with S3's multipart ETag (8 MiB parts, 128 of them) and a
       FULL_OBJECT crc64nvme: the crc64nvme is the claim checked (<= 1.15)
   9a. the multipart ETag alone: one md5 pass per candidate part size
       (here one: 8 MiB), on a lane beside the file's md5 (no target;
       the price of an ETag-only object)
   9b. a COMPOSITE crc32c of 8 MiB parts alone (no target)

nginx serves the file twice, once with the claims as ``add_header`` lines,
once plain (nginx's own ETag, ``"<mtime>-<length>"``, is no claim).
Every md5 is checked against the file's, and every claim's outcome read
back (``server_digest``: verified, the part size found).

    .venv/bin/python -m bench.claims
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench.common import Stack, table
from bench.perf import GiB, MiB, Nginx
from service.model.digests import new_hash

PART = 8 * MiB


def make_file(root: Path) -> dict[str, str]:
    """The file, and its md5, crc64nvme, multipart ETag and COMPOSITE crc32c."""
    md5, crc64 = hashlib.md5(), new_hash("crc64nvme")
    part_md5s, part_crcs = [], []
    with open(root / "f1g", "wb") as out:
        block = os.urandom(PART)
        for i in range(GiB // PART):
            part = bytes([i % 256]) + block[1:]
            out.write(part)
            md5.update(part)
            crc64.update(part)
            part_md5s.append(hashlib.md5(part).digest())
            crc = new_hash("crc32c")
            crc.update(part)
            part_crcs.append(crc.digest())
    composite = new_hash("crc32c")
    composite.update(b"".join(part_crcs))
    return {"md5": md5.hexdigest(), "crc64nvme": base64.b64encode(crc64.digest()).decode(),
            "etag": f'"{hashlib.md5(b"".join(part_md5s)).hexdigest()}-{len(part_md5s)}"',
            "crc32c": f"{base64.b64encode(composite.digest()).decode()}-{len(part_crcs)}"}


def locations(root: Path, sums: dict[str, str]) -> str:
    etag = sums["etag"].replace('"', '\\"')
    shapes = {
        "both": [f'ETag "{etag}"', f'x-amz-checksum-crc64nvme "{sums["crc64nvme"]}"',
                 'x-amz-checksum-type "FULL_OBJECT"'],
        "etag": [f'ETag "{etag}"'],
        "composite": [f'x-amz-checksum-crc32c "{sums["crc32c"]}"',
                      'x-amz-checksum-type "COMPOSITE"'],
    }
    return "".join(
        f"location = /{name}/f1g {{ alias {root}/f1g; etag off; "
        + " ".join(f"add_header {h} always;" for h in headers) + " }\n"
        for name, headers in shapes.items())


class Bench:
    def __init__(self, stack: Stack, nginx: Nginx, sums: dict[str, str]):
        self.stack, self.nginx, self.sums = stack, nginx, sums
        self.session = requests.Session()

    def one(self, path: str) -> tuple[float, dict | None]:
        t0 = time.monotonic()
        r = self.session.post(self.stack.base + "/submit", timeout=30,
                              data={"url": self.nginx.url(path), "algorithms": "md5"})
        task_id = r.json()["id"]
        while self.session.get(self.stack.base + "/check", params={"id": task_id},
                               timeout=30).status_code == 202:
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
        task = self.session.get(f"{self.stack.base}/tasks/{task_id}", timeout=30).json()
        if task["status"] != "done" or task["md5"] != self.sums["md5"]:
            raise SystemExit(f"WRONG RESULT for {path}: {task}")
        return elapsed, task["server_digest"]


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="md5claims-"))
    root.chmod(0o755)
    rows, verdicts = [], []
    try:
        print("making the file...", flush=True)
        sums = make_file(root)
        nginx = Nginx(root, server=locations(root, sums))
        try:
            with Stack() as stack:
                bench = Bench(stack, nginx, sums)
                bench.one("f1g")  # warm up
                times: dict[str, list[float]] = {p: [] for p in ("plain", "both", "etag",
                                                                  "composite")}
                seen: dict[str, dict | None] = {}
                # Interleaved, best of three each: drift hits all alike.
                for _ in range(3):
                    for shape in times:
                        path = "f1g" if shape == "plain" else f"{shape}/f1g"
                        elapsed, seen[shape] = bench.one(path)
                        times[shape].append(elapsed)
        finally:
            nginx.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = min(times["plain"])
    expected = {"both": ("x-amz-checksum-crc64nvme", None),
                "etag": ("ETag", PART), "composite": ("x-amz-checksum-crc32c", PART)}
    for n, shape, what, target in (
            ("9", "both", "multipart ETag + crc64nvme vs no claims", 1.15),
            ("9a", "etag", "multipart ETag alone vs no claims", None),
            ("9b", "composite", "COMPOSITE crc32c alone vs no claims", None)):
        server = seen[shape] or {}
        ok = (server.get("header"), server.get("part_size")) == expected[shape] \
            and server.get("verified") is True
        if not ok:
            raise SystemExit(f"claim not verified as expected for {shape}: {server}")
        ratio = min(times[shape]) / base
        meets = target is None or ratio <= target
        rows.append((n, what, f"{min(times[shape]):.3f}s", f"{base:.3f}s", f"{ratio:.2f}",
                     f"<= {target}" if target else "-", "PASS" if meets else "FAIL"))
        if target is not None:
            verdicts.append(meets)
    print(table(rows, ("#", "benchmark", "md5-light", "baseline", "ratio", "target", "")))
    print(f"BENCH {'PASS' if all(verdicts) else 'FAIL'}: {sum(verdicts)}/{len(verdicts)} "
          "targets met, every md5 checked, every claim verified")
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
