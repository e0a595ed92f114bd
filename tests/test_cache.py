"""max_age (#15): a submit may be answered from an earlier download of the
same file, at once while that result is young enough, else after the
server says 304 Not Modified to its validators. Counted on a real file
server that answers conditional requests, through a real service."""

from __future__ import annotations

import time
import uuid

import pytest
import requests
from fileserver import VersionedHandler, md5_of


def submit(service, url: str, **data) -> str:
    r = requests.post(service.base + "/submit", data={"url": url, **data}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def versioned(files, validator: str = "etag", size: int = 20_000) -> tuple[str, str]:
    key = uuid.uuid4().hex[:16]
    return key, files.url(f"/versioned/{key}/{size}?validator={validator}")


def test_without_max_age_every_submit_downloads(service, files):
    key, url = versioned(files)
    first = submit(service, url)
    assert service.wait(first).status_code == 200
    second = submit(service, url)
    assert service.wait(second).status_code == 200
    assert [s[0] for s in VersionedHandler.seen[key]] == [200, 200]
    assert VersionedHandler.seen[key][1][1] is None  # not even a conditional request
    assert service.task(second)["cached_from"] is None


def test_a_young_result_answers_at_once(service, files):
    key, url = versioned(files)
    first = submit(service, url)
    assert service.wait(first).status_code == 200
    second = submit(service, url, max_age="3600")
    r = service.check(second)  # no waiting: it is answered already
    assert r.status_code == 200
    assert r.text == '{"md5":"%s","status":"done","url":"%s"}' % (md5_of(20_000), url)
    view = service.task(second)
    assert view["cached_from"] == first and view["attempts"] == 0
    assert view["max_age"] == 3600 and view["revalidated"] is None
    assert len(VersionedHandler.seen[key]) == 1


def test_an_older_result_is_revalidated_and_a_304_downloads_nothing(service, files):
    key, url = versioned(files)
    first = submit(service, url)
    assert service.wait(first).status_code == 200
    time.sleep(2.1)
    second = submit(service, url, max_age="1")
    assert service.wait(second).json()["md5"] == md5_of(20_000)
    view = service.task(second)
    assert view["revalidated"] is True and view["cached_from"] == first
    assert view["attempts"] == 1 and view["bytes_fetched"] == 0
    assert VersionedHandler.seen[key][-1] == (304, f'"{key}-v0"', None, 0)
    # The 304 made the result young again: answered at once from it now.
    third = submit(service, url, max_age="60")
    assert service.check(third).status_code == 200
    assert service.task(third)["cached_from"] == second
    assert len(VersionedHandler.seen[key]) == 2


def test_a_changed_file_is_downloaded_again(service, files):
    key, url = versioned(files)
    first = submit(service, url)
    assert service.wait(first).status_code == 200
    VersionedHandler.versions[key] = 1
    time.sleep(2.1)
    second = submit(service, url, max_age="1")
    assert service.wait(second).json()["md5"] == md5_of(20_000, seed=1)
    view = service.task(second)
    assert view["revalidated"] is None and view["cached_from"] is None
    assert VersionedHandler.seen[key][-1] == (200, f'"{key}-v0"', None, 20_000)


def test_a_strong_last_modified_revalidates_too(service, files):
    key, url = versioned(files, "lastmod")
    first = submit(service, url)
    assert service.wait(first).status_code == 200
    time.sleep(2.1)
    second = submit(service, url, max_age="1")
    assert service.wait(second).status_code == 200
    status, inm, ims, sent_bytes = VersionedHandler.seen[key][-1]
    assert status == 304 and sent_bytes == 0 and ims is not None and inm is None
    assert service.task(second)["revalidated"] is True


def test_a_weak_etag_is_not_trusted_to_reuse_digests(service, files):
    # W/ promises the same meaning, not the same bytes: download again.
    key, url = versioned(files, "weak")
    first = submit(service, url)
    assert service.wait(first).status_code == 200
    time.sleep(2.1)
    second = submit(service, url, max_age="1")
    assert service.wait(second).json()["md5"] == md5_of(20_000)
    assert VersionedHandler.seen[key][-1] == (200, None, None, 20_000)
    assert service.task(second)["revalidated"] is None


@pytest.mark.parametrize("how", ["bare304", "lie304"])
def test_a_304_that_does_not_name_the_version_is_not_trusted(service, files, how):
    # A 304 without the ETag asked with (or a server answering 304 to
    # anything): the digests are not reused, the file is fetched again.
    key, url = versioned(files)
    url += f"&{how}=1"
    first = submit(service, url)
    assert service.wait(first).status_code == 200
    version = 1 if how == "lie304" else 0  # lie304: the file changed, the 304 says so
    VersionedHandler.versions[key] = version
    time.sleep(2.1)
    second = submit(service, url, max_age="1")
    assert service.wait(second).json()["md5"] == md5_of(20_000, seed=version)
    assert [s[0] for s in VersionedHandler.seen[key]] == [200, 304, 200]
    assert VersionedHandler.seen[key][-1][1:3] == (None, None)  # asked without conditionals
    assert service.task(second)["revalidated"] is None


def test_a_cached_answer_is_judged_by_its_own_expected_checksum(service, files):
    key, url = versioned(files)
    first = submit(service, url)
    assert service.wait(first).status_code == 200
    wrong = submit(service, url, max_age="3600", expected="md5:" + "0" * 32)
    r = service.check(wrong)
    assert r.status_code == 502 and r.json()["verified"] is False
    assert "expected md5 " + "0" * 32 in r.json()["error"]
    right = submit(service, url, max_age="3600", expected=f"md5:{md5_of(20_000)}")
    assert service.check(right).json()["verified"] is True
    assert len(VersionedHandler.seen[key]) == 1


def test_other_digests_are_another_cache_entry(service, files):
    key, url = versioned(files)
    assert service.wait(submit(service, url)).status_code == 200
    other = submit(service, url, max_age="3600", algorithms="sha256")
    assert service.wait(other).status_code == 200
    assert service.task(other)["cached_from"] is None
    assert len(VersionedHandler.seen[key]) == 2


@pytest.mark.parametrize("value, needle", [
    ("abc", "whole number of seconds"), ("-1", "whole number"), ("1.5", "whole number"),
    ("99999999999", "at most"), ("٣", "whole number")])
def test_bad_max_age_is_a_400_that_says_why(service, files, value, needle):
    r = requests.post(service.base + "/submit", timeout=10,
                      data={"url": files.url("/bytes/10"), "max_age": value})
    assert r.status_code == 400 and needle in r.json()["error"], r.text


def test_the_idempotency_key_covers_max_age(service, files):
    key = uuid.uuid4().hex
    url = files.url("/bytes/10")
    first = requests.post(service.base + "/submit", data={"url": url, "max_age": "10"},
                          headers={"Idempotency-Key": key}, timeout=10)
    again = requests.post(service.base + "/submit", data={"url": url, "max_age": "20"},
                          headers={"Idempotency-Key": key}, timeout=10)
    assert first.status_code == 202 and again.status_code == 422
    assert "max_age" in again.json()["error"]


def test_readme_shared_downloads_query_through_mongosh(service, files):
    import json
    import os
    import re
    import subprocess
    from pathlib import Path

    from servicectl import ROOT
    mongosh = os.environ.get("MONGOSH") or str(ROOT / ".tools/node_modules/.bin/mongosh")
    assert Path(mongosh).exists(), "make test installs mongosh from npm"
    section = (ROOT / "README.md").read_text().split("## Task history in the Mongo shell", 1)[1]
    query = re.findall(r"```js\n(.*?)```", section, re.S)[2].strip()
    key, url = versioned(files)
    first = submit(service, url)
    assert service.wait(first).status_code == 200
    for _ in range(2):
        assert service.check(submit(service, url, max_age="3600")).status_code == 200
    out = subprocess.run([mongosh, service.env["MONGODB_URI"], "--quiet", "--json=relaxed",
                          "--eval", query], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    rows = {row["_id"]: row for row in json.loads(out.stdout)}
    assert rows[url] == {"_id": url, "followed": 0, "reused": 2}
    assert first not in rows  # tasks that downloaded alone are not counted
