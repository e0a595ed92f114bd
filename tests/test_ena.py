"""POST /manifests?ena=<accession>: ENA's file report, from a local Tornado
server that answers in its TSV format, then every file fetched from a real
FTP server (pyftpdlib) and checked against the MD5 at its own position.
Nothing reaches the internet."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.parse

import pytest
import requests
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from fileserver import md5_of
from ftpserver import FtpServer
from servicectl import Service

HEADER = "run_accession\tfastq_ftp\tfastq_md5\tfastq_bytes\tsubmitted_ftp\tsubmitted_md5"
ASKED: list[dict[str, str]] = []
REPORTS: dict[str, str] = {}


class FileReport(web.RequestHandler):
    def get(self) -> None:
        ASKED.append({k: self.get_argument(k) for k in self.request.arguments})
        report = REPORTS.get(self.get_argument("accession"))
        if report is None:
            # What the portal answers for an accession it does not know.
            self.set_status(204)
            return
        self.set_header("Content-Type", "text/plain")
        self.write(report)


class Portal:
    def __init__(self) -> None:
        self.port = 0
        ready = threading.Event()

        def run() -> None:
            async def main() -> None:
                sockets = bind_sockets(0, "127.0.0.1")
                self.port = sockets[0].getsockname()[1]
                HTTPServer(web.Application([(r"/ena/portal/api/filereport", FileReport)])) \
                    .add_sockets(sockets)
                ready.set()
                await asyncio.Event().wait()
            asyncio.run(main())

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)


@pytest.fixture(scope="module")
def ftp(tmp_path_factory):
    server = FtpServer(tmp_path_factory.mktemp("enaroot")).start()
    for name, size, seed in [("a_1.fastq.gz", 5000, 1), ("a_2.fastq.gz", 7000, 2),
                             ("b_1.fastq.gz", 3000, 3), ("b_2.fastq.gz", 4000, 4),
                             ("c.bam", 6000, 5)]:
        server.put(name, size, seed)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def svc(mongo, logs, ftp):
    portal = Portal()
    service = Service(mongo, logs, RESOLVE="ftp.ena.test=127.0.0.1",
                      ENA_PORTAL_URL=f"http://127.0.0.1:{portal.port}/ena/portal/api").start()
    yield service
    service.stop()


def path(ftp, name: str) -> str:
    """As ENA prints a path: host and path, no scheme."""
    return f"ftp.ena.test:{ftp.port}/{name}"


def row(run: str, fastq: list[str], md5s: list[str], submitted: str = "",
        submitted_md5: str = "") -> str:
    return "\t".join([run, ";".join(fastq), ";".join(md5s), "", submitted, submitted_md5])


def finished(svc, manifest_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        doc = requests.get(f"{svc.base}/manifests/{manifest_id}", timeout=10).json()
        if doc["status"] == "done" or time.monotonic() > deadline:
            return doc
        time.sleep(0.2)


def test_a_study_is_checked_file_by_file_and_an_unpaired_row_fails(svc, ftp):
    REPORTS["PRJEB11111"] = "\n".join([
        HEADER,
        row("ERR000001", [path(ftp, "a_1.fastq.gz"), path(ftp, "a_2.fastq.gz")],
            [md5_of(5000, 1), md5_of(7000, 2)]),
        # Two files, one MD5: which is whose cannot be told.
        row("ERR000002", [path(ftp, "b_1.fastq.gz"), path(ftp, "b_2.fastq.gz")],
            [md5_of(3000, 3)]),
        # No FASTQ: the submitted file and its MD5 instead.
        row("ERR000003", [], [], path(ftp, "c.bam"), md5_of(6000, 5)),
    ]) + "\n"
    r = requests.post(f"{svc.base}/manifests", params={"ena": "PRJEB11111"}, timeout=30)
    assert r.status_code == 202, r.text
    assert r.json()["lines"] == 5
    asked = ASKED[-1]
    assert asked["accession"] == "PRJEB11111" and asked["result"] == "read_run"
    assert asked["format"] == "tsv"
    assert set(asked["fields"].split(",")) >= {"fastq_ftp", "fastq_md5", "fastq_bytes",
                                               "submitted_ftp", "submitted_md5"}
    doc = finished(svc, r.json()["id"])
    assert doc["status"] == "done", doc
    assert doc["totals"]["ok"] == 3 and doc["totals"]["failed"] == 2
    lines = {line["url"].rsplit("/", 1)[1]: line for line in doc["results"]}
    assert lines["a_2.fastq.gz"]["outcome"] == "ok"
    assert lines["a_2.fastq.gz"]["expected"] == f"md5:{md5_of(7000, 2)}"
    assert lines["a_1.fastq.gz"]["url"] == f"ftp://ftp.ena.test:{ftp.port}/a_1.fastq.gz"
    assert lines["c.bam"]["outcome"] == "ok"
    for name in ("b_1.fastq.gz", "b_2.fastq.gz"):
        assert lines[name]["outcome"] == "failed" and lines[name]["expected"] is None
        assert "2 fastq_ftp file(s) but 1 fastq_md5" in lines[name]["error"]
        assert "ERR000002" in lines[name]["error"]
    text = requests.get(f"{svc.base}/manifests/{r.json()['id']}",
                        params={"format": "text"}, timeout=10).text
    assert "b_1.fastq.gz: FAILED open or read" in text


def test_a_wrong_md5_is_a_mismatch_and_the_form_field_works(svc, ftp):
    REPORTS["SRR2222222"] = HEADER + "\n" + row(
        "SRR2222222", [path(ftp, "a_1.fastq.gz"), path(ftp, "a_2.fastq.gz")],
        [md5_of(5000, 1), md5_of(7000, 99)]) + "\n"
    r = requests.post(f"{svc.base}/manifests", data={"ena": "SRR2222222"}, timeout=30)
    assert r.status_code == 202, r.text
    doc = finished(svc, r.json()["id"])
    assert doc["totals"]["ok"] == 1 and doc["totals"]["mismatch"] == 1


def test_every_line_unpaired_still_finishes(svc, ftp):
    REPORTS["ERX3333333"] = HEADER + "\n" + row(
        "ERR3333333", [path(ftp, "a_1.fastq.gz")], [md5_of(5000, 1), md5_of(7000, 2)]) + "\n"
    r = requests.post(f"{svc.base}/manifests", params={"ena": "ERX3333333"}, timeout=30)
    assert r.status_code == 202, r.text
    doc = finished(svc, r.json()["id"], timeout=10)
    assert doc["status"] == "done" and doc["totals"]["failed"] == 1


@pytest.mark.parametrize("accession", ["", "SRR12", "XYZ123456", "SRR123456;rm", "prjeb1"])
def test_a_malformed_accession_is_a_400(svc, accession):
    r = requests.post(f"{svc.base}/manifests", params={"ena": accession}, timeout=10)
    assert r.status_code == 400
    assert r.json()["error"].startswith("ena must be an ENA/SRA/DDBJ accession")


def test_an_unknown_accession_is_a_502_that_says_so(svc):
    r = requests.post(f"{svc.base}/manifests", params={"ena": "SAMEA9999999"}, timeout=30)
    assert r.status_code == 502
    assert r.json()["error"] == "ENA has no runs for SAMEA9999999"


def test_the_report_url_is_built_from_the_setting():
    from service.config import load
    from service.intake.ena import EnaReports
    reports = EnaReports(load(environ={"ENA_PORTAL_URL": "https://example.org/api/"}))
    url = urllib.parse.urlsplit(reports.report_url("ERR1"))
    assert (url.scheme, url.netloc, url.path) == ("https", "example.org", "/api/filereport")
    assert urllib.parse.parse_qs(url.query)["result"] == ["read_run"]
