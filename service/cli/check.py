"""``run.py check MANIFEST``: ``sha256sum -c`` for files on the web.

    python run.py check SHA256SUMS [--algorithm blake2b] [--email E]
                                  [--server http://127.0.0.1:8000]

MANIFEST holds ``<hex>  <url>`` lines (or ``SHA256 (<url>) = <hex>``, or a
JSON list); ``-`` reads standard input. Sends it to the service, shows one
progress bar for the whole manifest (files and bytes), then prints what
``sha256sum -c`` prints: ``URL: OK`` or ``URL: FAILED`` per line, and its
warnings on standard error. Exit status as sha256sum's: 0 all OK, 1 any
mismatch or failure; and 2 bad manifest, 3 service unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from service.cli.submit import (
    EXIT_BAD_INPUT,
    EXIT_DONE,
    EXIT_FAILED,
    EXIT_UNREACHABLE,
    auth_headers,
    default_server,
    size,
)


def _request(method: str, url: str, body: bytes | None = None,
             ctype: str = "text/plain") -> tuple[int, bytes]:
    headers = {**auth_headers(), **({"Content-Type": ctype} if body else {})}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def progress_line(totals: dict, lines: int) -> str:
    ended = sum(totals.get(k, 0) for k in ("ok", "mismatch", "failed"))
    width = 30
    filled = min(width, width * ended // max(lines, 1))
    done, total = totals.get("bytes_done", 0), totals.get("bytes_total", 0)
    return (f"[{'#' * filled}{'-' * (width - filled)}] {ended}/{lines} files  "
            f"{size(done)} / {size(total)}  ok {totals.get('ok', 0)}  "
            f"mismatch {totals.get('mismatch', 0)}  failed {totals.get('failed', 0)}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="run.py check",
                                     description="Verify the files a checksum list names.")
    parser.add_argument("manifest", help="a file of '<hex>  <url>' lines, or - for stdin")
    parser.add_argument("--algorithm", help="for bare digests of 128 hex digits: blake2b")
    parser.add_argument("--email", help="mail the summary here when all lines have ended")
    parser.add_argument("--server", default=default_server(),
                        help="the service (env MD5LIGHT_URL, default http://127.0.0.1:$PORT)")
    args = parser.parse_args(argv)
    server = args.server.rstrip("/")
    try:
        body = (sys.stdin.buffer.read() if args.manifest == "-"
                else open(args.manifest, "rb").read())
    except OSError as exc:
        print(f"run.py check: {args.manifest}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    query = {k: v for k, v in (("algorithm", args.algorithm), ("email", args.email)) if v}
    ctype = "application/json" if body.lstrip()[:1] == b"[" else "text/plain"
    try:
        code, answer = _request("POST", f"{server}/manifests?{urllib.parse.urlencode(query)}",
                                body, ctype)
        if code != 202:
            doc = json.loads(answer or b"{}")
            print(f"refused: {doc.get('error', code)}", file=sys.stderr)
            for bad in doc.get("lines", []):
                print(f"  line {bad['line']}: {bad['error']}", file=sys.stderr)
            return EXIT_BAD_INPUT if 400 <= code < 500 else EXIT_UNREACHABLE
        manifest = json.loads(answer)
        return _follow(server, manifest["id"], manifest["lines"])
    except (urllib.error.URLError, OSError) as exc:
        print(f"cannot reach {server}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


def _follow(server: str, manifest_id: str, lines: int) -> int:
    tty = sys.stderr.isatty()
    while True:
        code, answer = _request("GET", f"{server}/manifests/{manifest_id}?limit=1")
        doc = json.loads(answer) if code == 200 else {}
        if doc:
            line = progress_line(doc["totals"], lines)
            print(("\r" + line) if tty else line, end="" if tty else "\n",
                  file=sys.stderr, flush=True)
        if doc.get("status") == "done":
            break
        time.sleep(0.5 if tty else 2)
    if tty:
        print(file=sys.stderr)
    code, text = _request("GET", f"{server}/manifests/{manifest_id}?format=text")
    failed = False
    for line in text.decode("utf-8").splitlines():
        if line.startswith("WARNING: "):
            print(f"run.py check: {line}", file=sys.stderr)
            failed = True
        else:
            print(line)
    return EXIT_FAILED if failed else EXIT_DONE
