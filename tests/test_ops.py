"""Running it like infrastructure: compose file, image command, health,
metrics, logs, the Mongo shell queries of the README, scale-out, the
command-line client and history retention."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests
import yaml
from pymongo import MongoClient

from fileserver import CountingHandler, body, md5_of
from servicectl import ROOT, Service


def test_compose_file_names_services_and_settings():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"mongo", "app", "worker", "mail"} <= set(services)
    assert services["mongo"]["image"].startswith("mongo:")
    assert any(v.endswith(":/data/db") for v in services["mongo"]["volumes"])
    assert "healthcheck" in services["mongo"]
    for name in ("app", "worker"):
        svc = services[name]
        assert svc["build"] == "."
        env = svc["environment"]
        assert env["MONGODB_URI"] == "mongodb://mongo:27017/md5light"
        assert env["SMTP_HOST"] == "mail" and env["SMTP_PORT"] == "1025"
        assert svc["depends_on"]["mongo"]["condition"] == "service_healthy"
    assert services["app"]["command"][-1] == "api"
    assert services["worker"]["command"][-1] == "worker"
    assert "8000:8000" in services["app"]["ports"]
    assert "mailpit" in services["mail"]["image"]
    assert "mongo-data" in compose["volumes"]


def _dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    # The ENV instruction's settings (before the first RUN), those that
    # expand others (PATH=/opt/venv/bin:$PATH) left out.
    env_block = text.split("\nENV ", 1)[1].split("RUN")[0]
    env = {k: v for k, v in re.findall(r"\b([A-Z_]+)=(\S+?)\s*\\?$", env_block, re.M)
           if "$" not in v}
    return text, cmd, env


def test_dockerfile_shape():
    text, cmd, env = _dockerfile()
    assert text.startswith("#")
    # python:3.11-slim for users; make test-image passes its own base.
    assert "ARG BASE_IMAGE=python:3.11-slim" in text and "FROM ${BASE_IMAGE}" in text
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    assert env["HOST"] == "0.0.0.0" and env["PORT"] == "8000"
    assert "requirements-dev" not in text  # runtime dependencies only


def test_image_command_runs_on_embedded_database(tmp_path, logs):
    """The image's CMD, run here as it would run in the container."""
    _, cmd, env = _dockerfile()
    svc = Service(None, logs, **env)
    svc.env.pop("MONGODB_URI", None)
    svc.env.update(DATA_DIR=str(tmp_path / "data"), PORT=str(svc.port), HOST="127.0.0.1")
    log = open(svc.log_path, "ab")
    svc.proc = subprocess.Popen([sys.executable if c == "python" else c for c in cmd],
                                cwd=ROOT, env=svc.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        svc.wait_healthy()
        # Healthy means one live worker; the second may beat a moment later.
        deadline = time.monotonic() + 20
        while (report := requests.get(svc.base + "/health").json())["workers"] < 2:
            assert time.monotonic() < deadline, report
            time.sleep(0.1)
        assert report == {"database": "ok", "status": "ok", "workers": 2}
        assert (tmp_path / "data" / "mongodb.uri").exists()
    finally:
        assert svc.stop() == 0
    assert not (tmp_path / "data" / "mongodb.uri").exists()  # stopped cleanly


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics_move_when_tasks_run(make_service, files):
    svc = make_service(WORKERS="2", METRICS_DB_INTERVAL="0")
    before = requests.get(svc.base + "/metrics").text
    ids = [svc.submit(files.url(f"/bytes/{1000 + i}")) for i in range(6)]
    ids.append(svc.submit(files.url("/status/404")))
    svc.wait_all(ids)
    deadline = time.monotonic() + 15
    while True:  # the database's counts follow within a second or so
        after = requests.get(svc.base + "/metrics").text
        if _metric(after, "md5light_queue_depth") == 0 and \
                _metric(after, "md5light_tasks_stored") == 7 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert _metric(after, 'md5light_tasks_finished_total{outcome="done"}') - \
        _metric(before, 'md5light_tasks_finished_total{outcome="done"}') == 6
    assert _metric(after, 'md5light_tasks_finished_total{outcome="failed"}') == 1
    assert _metric(after, "md5light_bytes_hashed_total") == sum(1000 + i for i in range(6))
    assert _metric(after, "md5light_submissions_total") == 7
    assert _metric(after, "md5light_download_seconds_count") == 7
    assert _metric(after, "md5light_queue_wait_seconds_count") == 7
    assert _metric(after, 'md5light_tasks{status="running"}') == 0
    assert _metric(after, "md5light_queue_depth") == 0
    assert _metric(after, "md5light_tasks_stored") == 7


def test_json_logs_carry_task_id(make_service, files):
    svc = make_service(WORKERS="1", LOG_FORMAT="json")
    task_id = svc.submit(files.url("/bytes/42"))
    svc.wait(task_id)
    time.sleep(0.3)
    events = [json.loads(line) for line in svc.log().splitlines() if line.startswith("{")]
    mine = [e for e in events if e.get("task") == task_id]
    assert any("done" in e["message"] for e in mine)
    assert all({"time", "level", "logger", "message"} <= set(e) for e in events)


def _readme_queries() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Task history in the Mongo shell", 1)[1]
    block = re.search(r"```js\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_queries_through_mongosh(make_service, files):
    mongosh = os.environ.get("MONGOSH") or str(ROOT / ".tools/node_modules/.bin/mongosh")
    assert Path(mongosh).exists(), "make test installs mongosh from npm"
    svc = make_service(WORKERS="1")
    done = [svc.submit(files.url(f"/bytes/{10 + i}")) for i in range(3)]
    failed = [svc.submit(files.url("/status/404")) for _ in range(2)]
    svc.wait_all(done + failed)
    uri = svc.env["MONGODB_URI"]
    latest, failures, mean, mismatches, sha256s, manifests = _readme_queries()

    def run(query: str):
        out = subprocess.run([mongosh, uri, "--quiet", "--json=relaxed", "--eval", query],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr + out.stdout
        return json.loads(out.stdout)

    rows = run(latest)
    assert [r["_id"] for r in rows[:5]] == list(reversed(done + failed))
    assert rows[4]["md5"] == md5_of(10)
    assert run(failures) == [{"_id": "HTTP 404 Not Found from 127.0.0.1", "count": 2}]
    (summary,) = run(mean)
    assert summary["tasks"] == 3 and 0 < summary["mean_seconds"] < 30

    def post(path: str, **kwargs) -> str:
        r = requests.post(svc.base + path, timeout=10, **kwargs)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    host = files.url("/").split("/")[2]
    wrong = [post("/submit", data={"url": files.url(f"/bytes/{20 + i}"),
                                   "expected": "md5:" + "0" * 32}) for i in range(2)]
    sha = post("/submit", data={"url": files.url("/bytes/30"), "algorithms": "sha256"})
    svc.wait_all(wrong + [sha])
    assert run(mismatches) == [{"_id": host, "mismatches": 2}]
    assert run(sha256s)[0]["digests"]["sha256"] == hashlib.sha256(body(30)).hexdigest()
    manifest = post("/manifests", data=f"{hashlib.sha256(body(31)).hexdigest()}  "
                                       f"{files.url('/bytes/31')}\n")
    deadline = time.monotonic() + 30
    while requests.get(f"{svc.base}/manifests/{manifest}", timeout=10).json()["status"] \
            != "done":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    (latest_manifest,) = run(manifests)
    assert latest_manifest["_id"] == manifest and latest_manifest["totals"]["ok"] == 1


def test_scale_out_two_apis_three_workers(mongo, logs, files):
    db_name = f"scale_{uuid.uuid4().hex[:8]}"
    workers = [Service(mongo, logs, role="worker", db_name=db_name,
                       WORKER_CONCURRENCY="8").start(wait=False) for _ in range(3)]
    apis = [Service(mongo, logs, role="api", db_name=db_name) for _ in range(2)]
    try:
        for api in apis:
            api.start()
        # Every worker must be up before the burst, or the first two can
        # finish it before the third takes a task (a CI flake: 2 != 3).
        heartbeats = MongoClient(f"{mongo}/{db_name}").get_default_database()["workers"]
        deadline = time.monotonic() + 60
        while heartbeats.count_documents({}) < 3:
            assert time.monotonic() < deadline, "three workers did not report in 60 s"
            time.sleep(0.1)
        key = uuid.uuid4().hex[:8]
        ids = []
        for i in range(500):
            api = apis[i % 2]
            ids.append(api.submit(files.url(f"/count/{key}-{i}/{100 + i}?seed={i}")))
        results = apis[0].wait_all(ids, timeout=240)
        for i, task_id in enumerate(ids):
            assert results[task_id].json()["md5"] == md5_of(100 + i, i)
            assert CountingHandler.hits[f"{key}-{i}"] == 1  # downloaded exactly once
        tasks = MongoClient(f"{mongo}/{db_name}").get_default_database()["tasks"]
        assert tasks.count_documents({"attempts": 1, "status": "done"}) == 500
        used = {d["worker"] for d in tasks.find({}, {"worker": 1})}
        assert len(used) == 3  # every worker process took part
    finally:
        Service.stop_all(apis + workers)


def test_submit_client(service, files):
    env = dict(os.environ, MD5LIGHT_URL=service.base)
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "run.py"), "submit", *a],  # noqa: E731
                                    env=env, capture_output=True, text=True, timeout=60)
    out = run(files.url("/slow/3000000?parts=6&delay=0.4&seed=2"), "--wait")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{md5_of(3000000, 2)}  " \
        f"{files.url('/slow/3000000?parts=6&delay=0.4&seed=2')}"
    assert "/ 2.9 MiB" in out.stderr and "ETA" in out.stderr  # the progress display
    out = run(files.url("/status/404"), "--wait")
    assert out.returncode == 1 and "HTTP 404 Not Found" in out.stderr
    out = run("gopher://nope")
    assert out.returncode == 2 and "ftp:// or ftps://" in out.stderr
    out = run(files.url("/bytes/1"))
    assert out.returncode == 0 and re.fullmatch(r"[0-9a-f-]{36}\n", out.stdout)
    bad = dict(env, MD5LIGHT_URL="http://127.0.0.1:9")
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "submit", "http://x.com/"],
                         env=bad, capture_output=True, text=True, timeout=30)
    assert out.returncode == 3


def test_task_ttl_index(make_service, files, mongo):
    svc = make_service(WORKERS="1", TASK_TTL_DAYS="7")
    db = MongoClient(svc.env["MONGODB_URI"]).get_default_database()
    info = db.tasks.index_information()["retention"]
    assert info["key"] == [("finished_at", 1)] and info["expireAfterSeconds"] == 7 * 86400
    # The files' records (max_age) name URLs and tasks: they go as old.
    info = db.files.index_information()["retention"]
    assert info["key"] == [("at", 1)] and info["expireAfterSeconds"] == 7 * 86400
    svc.stop()
    shorter = Service(mongo, svc.log_path.parent, db_name=svc.db_name, WORKERS="1",
                      TASK_TTL_DAYS="2").start()
    try:
        for coll in (db.tasks, db.files):
            assert coll.index_information()["retention"]["expireAfterSeconds"] == 2 * 86400
    finally:
        shorter.stop()
    again = Service(mongo, svc.log_path.parent, db_name=svc.db_name, WORKERS="1").start()
    try:
        for coll in (db.tasks, db.files):  # unset: keep forever
            assert "retention" not in coll.index_information()
    finally:
        again.stop()
