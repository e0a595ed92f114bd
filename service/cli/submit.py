"""``run.py submit``: a command-line client for people.

    python run.py submit URL [--email E] [--sha256 ...] [--expect sha256:HEX] [--wait]
                             [--server http://127.0.0.1:8000]

Prints the task id; with --wait, shows progress (bytes of total, rate,
ETA) until it prints the checksums (``md5sum``'s line for md5 alone, else
``sha256sum --tag``'s, one per algorithm) or the failure; with --expect,
then ``URL: OK`` or ``URL: FAILED`` as ``sha256sum -c`` does. Ctrl-C
while waiting asks whether to cancel the task (DELETE /tasks/<id>); with
no terminal on stdin to ask on, it leaves the task running. Exit status:
0 done (or submitted, without --wait), 1 failed or mismatch, 2 bad input,
3 service unreachable, 4 cancelled (by someone else), 130 interrupted by
Ctrl-C.
Only the standard library, so it runs anywhere Python does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from service.model import claim_text

EXIT_DONE, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_CANCELLED, EXIT_INTERRUPTED = 4, 130


def _call(method: str, url: str, data: dict | None = None) -> tuple[int, dict]:
    body = urllib.parse.urlencode(data, doseq=True).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, method=method, headers=auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {"error": exc.reason}


def auth_headers() -> dict[str, str]:
    """The API key of MD5LIGHT_API_KEY, if set (run.py keys create)."""
    key = os.environ.get("MD5LIGHT_API_KEY", "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


def default_server() -> str:
    return os.environ.get("MD5LIGHT_URL", f"http://127.0.0.1:{os.environ.get('PORT', '8000')}")


def size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def progress_line(done: int, total: int | None, rate: float) -> str:
    if total:
        width = 30
        filled = min(width, int(width * done / total)) if total else 0
        bar = "#" * filled + "-" * (width - filled)
        eta = f"ETA {max(0, (total - done) / rate):.0f}s" if rate > 0 else "ETA ?"
        return f"[{bar}] {size(done)} / {size(total)}  {size(rate)}/s  {eta}"
    return f"{size(done)}  {size(rate)}/s"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="run.py submit",
                                     description="Submit a URL to md5-light.")
    parser.add_argument("url")
    parser.add_argument("--email", help="mail the result here")
    parser.add_argument("--wait", action="store_true", help="wait and show progress")
    for name in ("sha1", "sha256", "sha512", "blake2b", "crc32", "crc32c", "crc64nvme"):
        parser.add_argument(f"--{name}", action="append_const", const=name, dest="algorithms",
                            help=f"compute {name} too (md5 always is)")
    parser.add_argument("--expect", metavar="CHECKSUM",
                        help="verify: sha256:HEX, sha-256=HEX or sha256-BASE64 (implies --wait)")
    parser.add_argument("--mirror", action="append", metavar="URL", dest="mirrors",
                        help="another URL of the same file (repeat for more, at most 8)")
    parser.add_argument("--server", default=default_server(),
        help="the service (env MD5LIGHT_URL, default http://127.0.0.1:$PORT or :8000)")
    args = parser.parse_args(argv)
    server = args.server.rstrip("/")
    data = {"url": args.url}
    if args.email:
        data["email"] = args.email
    if args.algorithms:
        data["algorithms"] = ",".join(args.algorithms)
    if args.expect:
        data["expected"] = args.expect
        args.wait = True
    if args.mirrors:
        data["mirrors"] = args.mirrors
    try:
        code, doc = _call("POST", server + "/submit", data)
    except (urllib.error.URLError, OSError) as exc:
        print(f"cannot reach {server}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if code != 202:
        print(f"refused: {doc.get('error', code)}", file=sys.stderr)
        return EXIT_BAD_INPUT if 400 <= code < 500 else EXIT_UNREACHABLE
    task_id = doc["id"]
    if not args.wait:
        print(task_id)
        return EXIT_DONE
    print(f"task {task_id}", file=sys.stderr)
    try:
        return _wait(server, task_id)
    except KeyboardInterrupt:
        return _interrupted(server, task_id)


def _interrupted(server: str, task_id: str) -> int:
    """Ctrl-C while waiting: the task runs on in the service unless the
    person at the terminal asks to cancel it."""
    print(file=sys.stderr)
    if not sys.stdin.isatty():
        print(f"interrupted; task {task_id} was not cancelled (no terminal to ask on) and "
              f"keeps running: {server}/tasks/{task_id}", file=sys.stderr)
        return EXIT_INTERRUPTED
    # The question goes to stderr: stdout carries only results.
    print(f"Cancel task {task_id}? [y/N] ", end="", file=sys.stderr, flush=True)
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        answer = ""
        print(file=sys.stderr)
    if answer.strip().lower() not in ("y", "yes"):
        print(f"task {task_id} keeps running: {server}/tasks/{task_id}", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        code, doc = _call("DELETE", f"{server}/tasks/{task_id}")
    except (urllib.error.URLError, OSError) as exc:
        print(f"cannot reach {server} to cancel task {task_id}: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if code == 200:
        print(f"task {task_id} cancelled", file=sys.stderr)
    else:
        print(f"task {task_id} not cancelled: {doc.get('error') or doc.get('status') or code}",
              file=sys.stderr)
    return EXIT_INTERRUPTED


def _wait(server: str, task_id: str) -> int:
    tty = sys.stderr.isatty()
    last = (time.monotonic(), 0)
    rate = 0.0
    while True:
        try:
            code, task = _call("GET", f"{server}/tasks/{task_id}")
        except (urllib.error.URLError, OSError):
            time.sleep(1)
            continue
        if code == 200 and task["status"] in ("done", "failed", "cancelled"):
            break
        if code == 200:
            now, done = time.monotonic(), task.get("bytes_done") or 0
            if now > last[0] and done >= last[1]:
                rate = 0.7 * rate + 0.3 * (done - last[1]) / (now - last[0]) if rate else (
                    (done - last[1]) / (now - last[0]))
            last = (now, done)
            line = progress_line(done, task.get("bytes_total"), rate)
            print(("\r" + line + "   ") if tty else line, end="" if tty else "\n",
                  file=sys.stderr, flush=True)
        time.sleep(0.5)
    if tty:
        print(file=sys.stderr)
    return report(task)


def report(task: dict) -> int:
    """The result as the coreutils tools print theirs; the exit status."""
    digests = task.get("digests") or {"md5": task.get("md5")}
    if task["status"] == "done" or task.get("verified") is False:
        if list(digests) == ["md5"]:
            print(f"{digests['md5']}  {task['url']}")
        else:
            for algorithm, value in digests.items():
                print(f"{algorithm.upper()} ({task['url']}) = {value}")
    if task.get("expected"):
        print(f"{task['url']}: {'OK' if task.get('verified') else 'FAILED'}")
    server = task.get("server_digest")
    if server and task["status"] != "cancelled":
        # On stderr: stdout stays what the coreutils tools print.
        print(f"server: {claim_text.describe(server)}", file=sys.stderr)
    if task["status"] == "done":
        return EXIT_DONE
    if task["status"] == "cancelled":
        print(f"cancelled: task {task['id']} was cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    print(f"failed: {task['error']}", file=sys.stderr)
    return EXIT_FAILED
