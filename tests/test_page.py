"""The page at / in a real browser: Debian's Chromium driven by Playwright
against a real service and file server. A screenshot of each state goes to
test-output/screenshots/."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import requests
from fileserver import md5_of
from playwright.sync_api import expect, sync_playwright
from servicectl import ROOT, Service

from handlers.page import CSP

pytestmark = pytest.mark.timeout(180)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]
SHOTS = ROOT / "test-output" / "screenshots"


@pytest.fixture(scope="module")
def site(mongo, logs):
    """A service of its own, so that its task list holds only this file's tasks."""
    svc = Service(mongo, logs).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make test does)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, site):
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"],
                                  viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    # Script errors and CSP violations; a 4xx the page asked for (and
    # shows) is the browser's "Failed to load resource", not a problem.
    page.on("console", lambda m: problems.append(m.text) if m.type == "error"
            and not m.text.startswith("Failed to load resource") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.add_init_script("document.addEventListener('securitypolicyviolation', e => "
                         "console.error('CSP violation: ' + e.violatedDirective));")
    page.goto(site.base + "/")
    page.problems = problems  # type: ignore[attr-defined]
    yield page
    assert not problems, problems
    context.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def task_item(page, task_id: str):
    item = page.locator(f'li.task[data-id="{task_id}"]')
    item.wait_for(timeout=20_000)
    return item


def submit_in_page(page, url: str) -> str:
    """Fill the form with the keyboard alone and press Enter; the new task's id."""
    page.locator("#url").focus()
    page.keyboard.type(url)
    with page.expect_response(lambda r: r.url.endswith("/submit")) as answer:
        page.keyboard.press("Enter")
    assert answer.value.status == 202, answer.value.text()
    return answer.value.json()["id"]


def test_the_page_and_its_files_carry_a_strict_csp_and_nothing_from_elsewhere(site):
    assert "unsafe-inline" not in CSP and "unsafe-eval" not in CSP
    for path in ("/", "/static/app.js", "/static/app.css"):
        r = requests.get(site.base + path, timeout=10)
        assert r.status_code == 200, path
        assert r.headers["Content-Security-Policy"] == CSP
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        # Every asset is local: no other host is named anywhere.
        assert not re.search(r"(src|href)=\"(https?:)?//", r.text), path
        assert "<script>" not in r.text and " on" + "click=" not in r.text
    assert requests.get(site.base + "/static/nope.js", timeout=10).json() == {
        "error": "not found"}
    assert requests.get(site.base + "/static/../run.py", timeout=10).status_code in (403, 404)
    # The API is untouched: an unknown path is still JSON.
    assert requests.get(site.base + "/nope", timeout=10).json() == {"error": "not found"}


def test_watch_the_bar_move_see_the_md5_and_copy_it(page, files):
    size = 12 * 2**20
    task_id = submit_in_page(page, files.url(f"/slow/{size}?parts=24&delay=0.3&seed=71"))
    item = task_item(page, task_id)
    bar = item.locator("progress")
    seen: list[float] = []
    deadline = time.monotonic() + 60
    while len({v for v in seen if 0 < v < size}) < 2:
        assert time.monotonic() < deadline, f"the bar did not move: {seen}"
        seen.append(bar.evaluate("b => b.hasAttribute('value') ? b.value : -1"))
        time.sleep(0.2)
    assert item.locator(".status").text_content() == "running"
    page.wait_for_function("el => el.textContent.endsWith('/s')",
                           arg=item.locator(".rate").element_handle(), timeout=20_000)
    assert " of 12.0 MiB" in item.locator(".bytes").text_content()
    assert item.locator(".eta").text_content().endswith(" left")
    shot(page, "1-running")
    digest = item.locator("code.digest[data-algorithm=md5]")
    digest.wait_for(timeout=60_000)
    assert digest.text_content() == md5_of(size, 71)
    assert item.locator(".status").text_content() == "done"
    assert bar.evaluate("b => b.value === b.max")
    shot(page, "2-done")
    item.locator("button.copy").first.click()
    expect(item.locator(".copied").first).to_have_text("Copied")  # once the write resolved
    assert page.evaluate("navigator.clipboard.readText()") == md5_of(size, 71)
    shot(page, "3-copied")


def test_a_failed_task_shows_its_reason_in_words(page, files):
    task_id = submit_in_page(page, files.url("/status/404"))
    error = task_item(page, task_id).locator(".error")
    error.wait_for(state="visible", timeout=30_000)
    assert re.fullmatch(r"Failed: .*404.*", error.text_content()), error.text_content()
    shot(page, "4-failed")


def test_a_bad_url_gets_the_services_sentence(page):
    page.locator("#url").fill("gopher://example.com/file")
    page.locator("#submit-button").click()
    # expect(), not wait_for_function("..."): an expression string is
    # eval'ed in the page, which its own CSP (rightly) forbids.
    expect(page.locator("#submit-message")).to_have_text(re.compile("^url must"))
    assert page.locator("#submit-message").text_content() == (
        "url must start with http://, https://, ftp:// or ftps://")
    shot(page, "5-refused")


XSS = ['/bytes/10?q=<script>window.__xss=1</script>',
       '/bytes/10?q="><img/src=x/onerror=window.__xss=2>',
       "/bytes/10?q=<svg/onload=window.__xss=3>"]


def test_user_strings_stay_inert_text(page, site, files):
    urls = [files.url(path) for path in XSS]
    ids = [site.submit(url) for url in urls]
    for task_id in ids:
        site.wait(task_id)
    page.reload()
    for task_id, url in zip(ids, urls, strict=True):
        item = task_item(page, task_id)
        assert item.locator(".url").text_content() == url
    assert page.evaluate("window.__xss") is None
    assert page.locator("#tasks img, #tasks svg, #tasks script").count() == 0
    assert page.locator("script").count() == 1  # app.js alone
    # The detail view shows it as text too, and closes with the keyboard.
    task_item(page, ids[1]).locator("button.details").click()
    dialog = page.locator("#detail")
    dialog.wait_for(state="visible")
    assert urls[1] in dialog.locator("#detail-fields").text_content()
    assert dialog.locator("img").count() == 0
    shot(page, "6-xss-detail")
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")
    assert page.evaluate("window.__xss") is None


def test_a_manifest_upload_shows_its_totals_moving(page, files):
    size = 3 * 2**20
    lines = "\n".join(f"{md5_of(size, 80 + i)}  "
                      f"{files.url(f'/slow/{size}?parts=8&delay=0.25&seed={80 + i}')}"
                      for i in range(3))
    page.locator("#manifest-text").fill(lines)
    page.locator("#manifest-form button[type=submit]").click()
    ok = page.locator('#manifest-totals dd[data-total="OK"]')
    ok.wait_for(timeout=20_000)
    values = set()
    deadline = time.monotonic() + 60
    while ok.text_content() != "3":
        assert time.monotonic() < deadline, values
        values.add(page.locator('#manifest-totals dd[data-total="Downloaded"]').text_content())
        if len(values) == 2:
            shot(page, "7-manifest-running")
        time.sleep(0.2)
    assert len(values) >= 2, values  # the bytes moved while it ran
    expect(page.locator("#manifest-message")).to_have_text("Every file verified.")
    assert page.locator("#manifest-bar").evaluate("b => b.value === b.max")
    shot(page, "8-manifest-done")


def test_it_reads_on_a_phone(browser, site):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                                  has_touch=True, device_scale_factor=2)
    page = context.new_page()
    page.goto(site.base + "/")
    page.locator("li.task").first.wait_for(timeout=20_000)
    # Nothing wider than the screen: long URLs and digests wrap.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shot(page, "9-phone")
    context.close()


def test_the_list_shows_this_browsers_tasks_and_an_operator_every_task(browser, mongo, logs,
                                                                      files):
    # Once keys exist, a browser without one sees the tasks it submitted,
    # not another client's; the operator's key shows every task.
    from test_access import bearer, make_key, submit
    svc = Service(mongo, logs).start()
    try:
        bob, ops = make_key(svc, "bob"), make_key(svc, "ops", "--operator")
        theirs = submit(svc, files.url("/bytes/1000?seed=81"), bob)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.goto(svc.base + "/")
        ours = submit_in_page(page, files.url("/bytes/2000?seed=82"))
        task_item(page, ours).locator("code.digest[data-algorithm=md5]").wait_for(
            timeout=30_000)
        expect(page.locator("#tasks-scope")).to_have_text(
            "Showing the tasks submitted from this browser.")
        assert page.locator(f'li.task[data-id="{theirs}"]').count() == 0
        assert page.locator("li.task").count() == 1
        page.reload()  # remembered across visits
        task_item(page, ours)
        page.locator("#key-box summary").click()
        page.locator("#api-key").fill(ops)
        page.locator("#key-form button").click()
        expect(page.locator("#key-message")).to_have_text("Key saved.")
        task_item(page, theirs)
        expect(page.locator("#tasks-scope")).to_have_text("")
        shot(page, "7-operator-sees-all")
        page.locator("#api-key").fill("md5l_000000000000_" + "A" * 43)
        page.locator("#key-form button").click()
        expect(page.locator("#key-message")).to_have_text("the API key is not valid")
        assert requests.get(svc.base + "/tasks", headers=bearer(bob),
                            timeout=10).json()["tasks"][0]["id"] == theirs
        context.close()
    finally:
        svc.stop()


def test_a_task_says_which_server_claim_was_checked_and_how(page, files):
    part = 5 * 2**20
    verified = submit_in_page(page, files.url(f"/store/{2 * part + 1}?etag={part}"))
    row = task_item(page, verified).locator("li.server")
    row.wait_for(timeout=60_000)
    assert row.get_attribute("class") == "server verified"
    assert row.text_content() == ("Server: verified against the server's ETag (md5 of 3 "
                                  "parts), with parts of 5 MiB.")
    page.locator("#url").fill("")
    odd = submit_in_page(page, files.url(f"/store/{2 * 7 * 2**20 + 10}?etag={7 * 2**20}"))
    row = task_item(page, odd).locator("li.server")
    row.wait_for(timeout=60_000)
    assert row.get_attribute("class") == "server unverified"
    assert row.text_content().startswith("Server: the server's ETag (md5 of 3 parts) is "
                                         "unverified: no part size tried (5 MiB)")
    shot(page, "9-server-claims")
