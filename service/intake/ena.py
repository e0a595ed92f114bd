"""A manifest from an ENA accession: the files ENA's file report lists for
a run, experiment, sample or study, each verified against the MD5 ENA
publishes for it.

The report (``<ENA_PORTAL_URL>/filereport``, TSV) lists per run
``fastq_ftp`` and ``fastq_md5`` (and ``submitted_ftp``/``submitted_md5``)
as ``;``-separated lists: the n-th MD5 is the n-th file's. A row whose
lists differ in length cannot say which MD5 is whose, so its files become
failed lines with that reason, never guessed pairs (nf-core/fetchngs#331
verified files against the wrong MD5 that way). Paths come without a
scheme (``ftp.sra.ebi.ac.uk/vol1/...``) and are read as ftp://; with the
default FTP_PREFER_HTTPS they are then fetched over HTTPS.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from service.config import Config
from service.fetch.netpolicy import AddressPolicy, FilteringResolver, parse_overrides
from service.intake.validation import InvalidInput, check_url
from service.model.digests import Checksum, DigestSpecError, checksum_from_hex
from service.model.manifest import MAX_LINES

# Runs (ERR/SRR/DRR), experiments (ERX...), samples (ERS..., SAMEA...),
# studies (ERP/SRP/DRP, PRJEB/PRJNA/PRJDB), as INSDC assigns them.
ACCESSION = re.compile(r"[EDS]R[RXSP][0-9]{6,}|PRJ[EDN][A-Z][0-9]+|SAM[EDN][A-Z]?[0-9]+",
                       re.ASCII)
FIELDS = ("run_accession", "fastq_ftp", "fastq_md5", "fastq_bytes", "submitted_ftp",
          "submitted_md5")
MAX_REPORT = 16 * 1024 * 1024
TIMEOUT = 30.0


class EnaError(Exception):
    """ENA could not be asked, or said nothing usable: a 502 that says why."""


@dataclasses.dataclass(frozen=True)
class EnaLine:
    """One file of the report: a URL and its MD5, or why it has none."""
    number: int
    url: str
    expected: Checksum | None
    error: str | None = None


def check_accession(value: str | None) -> str:
    accession = (value or "").strip()
    if not ACCESSION.fullmatch(accession):
        raise InvalidInput(
            "ena must be an ENA/SRA/DDBJ accession of a run, experiment, sample or study "
            "(like ERR123456, SRX123456, SAMEA123456, PRJEB12345)")
    return accession


class EnaReports:
    def __init__(self, config: Config):
        self.base = config.ena_portal_url.rstrip("/")
        self.policy = AddressPolicy(config.allow_private_urls, config.allow_networks)
        self.overrides = parse_overrides(config.resolve)
        self.timeout = config.connect_timeout
        self._client: AsyncHTTPClient | None = None

    def _http(self) -> AsyncHTTPClient:
        if self._client is None:
            # Its own client: the report is read under the address policy,
            # its body bounded.
            self._client = SimpleAsyncHTTPClient(
                force_instance=True, max_body_size=MAX_REPORT,
                resolver=FilteringResolver(policy=self.policy, overrides=self.overrides))
        return self._client

    def report_url(self, accession: str) -> str:
        query = urllib.parse.urlencode({"accession": accession, "result": "read_run",
                                        "fields": ",".join(FIELDS), "format": "tsv"})
        return f"{self.base}/filereport?{query}"

    async def lines(self, accession: str) -> list[EnaLine]:
        url = self.report_url(accession)
        try:
            response = await self._http().fetch(HTTPRequest(
                url, connect_timeout=self.timeout, request_timeout=TIMEOUT,
                headers={"Accept": "text/plain"}), raise_error=True)
        except HTTPClientError as exc:
            if exc.code == 204 or (exc.code in (400, 404) and _no_results(exc)):
                raise EnaError(f"ENA has no runs for {accession}") from None
            raise EnaError(f"ENA's portal answered HTTP {exc.code} for {accession}") from None
        except Exception as exc:  # noqa: BLE001 - any failure to ask is one answer
            raise EnaError(f"ENA's portal could not be asked about {accession}: "
                           f"{type(exc).__name__}: {str(exc)[:200]}") from None
        if response.code == 204 or not response.body.strip():
            raise EnaError(f"ENA has no runs for {accession}")
        return parse_report(response.body, accession, self.policy)


def _no_results(exc: HTTPClientError) -> bool:
    body = exc.response.body if exc.response is not None else b""
    return b"No results" in (body or b"") or b"Invalid accession" in (body or b"")


def parse_report(body: bytes, accession: str, policy: AddressPolicy) -> list[EnaLine]:
    """The report's files as manifest lines, numbered from 1 in the
    report's order."""
    try:
        rows = [line.split("\t") for line in body.decode("utf-8").splitlines() if line]
    except UnicodeDecodeError:
        raise EnaError("ENA's report is not UTF-8") from None
    if not rows:
        raise EnaError(f"ENA has no runs for {accession}")
    header = [name.strip() for name in rows[0]]
    if "fastq_ftp" not in header or "fastq_md5" not in header:
        raise EnaError("ENA's report has no fastq_ftp and fastq_md5 columns")
    lines: list[EnaLine] = []
    for cells in rows[1:]:
        row = dict(zip(header, (c.strip() for c in cells), strict=False))
        run = row.get("run_accession") or accession
        kind = "fastq" if row.get("fastq_ftp") else "submitted"
        urls = _split(row.get(f"{kind}_ftp", ""))
        md5s = _split(row.get(f"{kind}_md5", ""))
        if len(urls) != len(md5s):
            why = (f"ENA lists {len(urls)} {kind}_ftp file(s) but {len(md5s)} {kind}_md5 "
                   f"value(s) for {run}: which MD5 belongs to which file cannot be told, "
                   "so this file was not checked")
            for url in urls:
                lines.append(EnaLine(len(lines) + 1, _url(url, policy, None) or url, None, why))
            continue
        for url, md5 in zip(urls, md5s, strict=True):
            problem: list[str] = []
            checked = _url(url, policy, problem)
            checksum = None
            try:
                checksum = checksum_from_hex("md5", md5)
            except DigestSpecError as exc:
                problem.append(f"ENA's fastq_md5 for {run} is not an MD5: {exc}")
            lines.append(EnaLine(len(lines) + 1, checked or url, checksum,
                                 "; ".join(problem) or None))
        if len(lines) > MAX_LINES:
            raise EnaError(f"{accession} has more than {MAX_LINES} files; the limit of a "
                           "manifest")
    if not lines:
        raise EnaError(f"ENA lists no files for {accession}")
    return lines


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(";")] if value.strip() else []


def _url(path: str, policy: AddressPolicy, problem: list[str] | None) -> str | None:
    """ENA's scheme-less path as a checked URL (None, and the reason in
    ``problem``, when it is not one this service fetches)."""
    url = path if "://" in path else f"ftp://{path}"
    try:
        return check_url(url, policy)
    except InvalidInput as exc:
        if problem is not None:
            problem.append(f"ENA's file path is not usable: {exc}")
        return None
