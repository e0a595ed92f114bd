"""Fast in-process tests of the logic the end-to-end suite reaches only
indirectly: error classification, configuration, the task model, the
hashing sink, mail error mapping, claim races on the real database, and the
retry policy."""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import hashlib
import smtplib
import socket
import ssl
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from tornado import httputil
from tornado.iostream import StreamClosedError
from tornado.simple_httpclient import HTTPStreamClosedError, HTTPTimeoutError

from service import config as config_mod
from service.backoff import Backoff
from service.fetch import tornado_hooks as hooks
from service.fetch.errors import FetchError, classify
from service.fetch.hashing import BLOCK, DEPTH, DigestSink
from service.fetch.netpolicy import BlockedAddress, InvalidHostName, UnresolvableHost
from service.live.answers import CheckAnswers
from service.model.digests import ALGORITHMS, Checksum, ServerDigest
from service.model.same_file import KnownFile
from service.model.task import NoteStatus, Notification, Status, Task, TaskError
from service.model.views import check_view, task_view
from service.notify.mailer import Mailer, MailError
from service.storage.store import open_store

# -- error classification: every code ----------------------------------------

CASES = [
    (BlockedAddress("evil.test", "10.0.0.1"), "blocked", False,
     "evil.test resolves to 10.0.0.1, which is a private or reserved address that this "
     "service does not fetch from"),
    (UnresolvableHost("gone.test", transient=False), "dns", False,
     "could not resolve host gone.test"),
    (UnresolvableHost("flaky.test", transient=True), "dns", True,
     "could not resolve host flaky.test"),
    (InvalidHostName("a..b"), "dns", False, "'a..b' is not a valid host name"),
    (socket.gaierror(socket.EAI_AGAIN, "again"), "dns", True, "could not resolve host h.test"),
    (HTTPTimeoutError("Timeout while connecting"), "timeout", True,
     "timed out connecting to h.test (CONNECT_TIMEOUT 3 s)"),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "connection", True,
     "connection refused by h.test"),
    (HTTPStreamClosedError("Stream closed"), "connection", True,
     "connection to h.test closed after 42 bytes"),
    (StreamClosedError(), "connection", True, "connection to h.test closed after 42 bytes"),
    (hooks.MalformedResponse("it sent both Transfer-Encoding and Content-Length"),
     "bad_response", False,
     "h.test sent a malformed HTTP response: it sent both Transfer-Encoding and "
     "Content-Length"),
    (hooks.HeadersTooLarge("its response headers are larger than 64 KiB"), "bad_response",
     False, "h.test sent a malformed HTTP response: its response headers are larger than "
     "64 KiB"),
    (httputil.HTTPInputError("Response code 101 cannot have body"), "bad_response", False,
     "h.test sent a malformed HTTP response: Response code 101 cannot have body"),
    (ValueError("Unsupported url scheme: ftp://h.test/x"), "redirects", False,
     "redirect to an unsupported URL scheme from h.test"),
    (UnicodeError("label too long"), "redirects", False,
     "h.test redirected to a host name that is not valid"),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), "connection", False,
     "could not connect to h.test: Network is unreachable"),
    (OSError(errno.EPIPE, "Broken pipe"), "connection", True,
     "could not connect to h.test: Broken pipe"),
    (RuntimeError("odd http://h.test/x?token=SECRET"), "unknown", True,
     "download from h.test failed: odd http://h.test/x"),
]


@pytest.mark.parametrize("exc,code,transient,message", CASES,
                         ids=[f"{type(c[0]).__name__}-{c[1]}" for c in CASES])
def test_classify(exc, code, transient, message):
    error = classify(exc, "h.test", bytes_done=42, connect_timeout=3)
    assert (error.code, error.transient, error.message) == (code, transient, message)


def test_tls_errors_are_permanent():
    cert = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cert.verify_message = "self-signed certificate"
    error = classify(cert, "h.test")
    assert (error.code, error.transient) == ("tls", False)
    assert error.message == "TLS certificate of h.test is not valid: self-signed certificate"
    handshake = ssl.SSLError(1, "handshake")
    handshake.reason = "WRONG_VERSION_NUMBER"
    assert classify(handshake, "h.test").message == \
        "TLS handshake with h.test failed: WRONG_VERSION_NUMBER"


def test_fetch_error_becomes_task_error():
    error = FetchError("timeout", "no data from h.test for 30 s", True)
    assert error.as_task_error() == TaskError("timeout", "no data from h.test for 30 s")


# -- configuration ------------------------------------------------------------

def test_config_from_environment_with_units():
    config = config_mod.load(None, {"MAX_FILE_SIZE": "512MiB", "IDLE_TIMEOUT": "2m",
                                    "ALLOW_PRIVATE_URLS": "yes", "RESOLVE": "a=1.2.3.4, b=::1",
                                    "WORKERS": "3"})
    assert config.max_file_size == 512 * 1024**2
    assert config.idle_timeout == 120.0
    assert config.allow_private_urls is True
    assert config.resolve == ("a=1.2.3.4", "b=::1")
    assert config.workers == 3 and config.embedded


def test_config_flag_wins_over_environment():
    import argparse
    parser = argparse.ArgumentParser()
    config_mod.add_arguments(parser)
    args = parser.parse_args(["--port", "9001"])
    assert config_mod.load(args, {"PORT": "9000"}).port == 9001


@pytest.mark.parametrize("env,problem", [
    ({"MAX_FILE_SIZE": "ten"}, "MAX_FILE_SIZE: not a size"),
    ({"IDLE_TIMEOUT": "soon"}, "IDLE_TIMEOUT: not a duration"),
    ({"ALLOW_PRIVATE_URLS": "maybe"}, "ALLOW_PRIVATE_URLS: not a boolean"),
    ({"SMTP_TLS": "tls"}, "SMTP_TLS must be none, starttls or ssl"),
    ({"RESOLVE": "nohost"}, "RESOLVE entry 'nohost' is not HOST=ADDRESS"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT must be text or json"),
])
def test_config_errors_name_the_setting(env, problem):
    with pytest.raises(SystemExit) as exc:
        config_mod.load(None, env)
    assert problem in str(exc.value)


def test_config_round_trips_through_the_environment():
    config = config_mod.load(None, {"ALLOW_NETWORKS": "10.0.0.0/8,192.168.0.0/16",
                                    "TASK_TTL_DAYS": "7", "MAX_FILE_SIZE": "1GiB"})
    assert config_mod.load(None, config_mod.to_environ(config)) == config


# -- the task model -----------------------------------------------------------

def test_task_document_round_trip():
    task = Task.new("http://h.test/f", "u@example.com", mail_enabled=True, client="1.2.3.4",
                    algorithms=["md5", "sha256"], expected=Checksum("sha256", "ab" * 32))
    task.status, task.md5, task.attempts = Status.DONE, "d41d8cd98f00b204e9800998ecf8427e", 2
    task.digests = {"md5": task.md5, "sha256": "ab" * 32}
    task.verified = True
    task.server_digest = ServerDigest("md5", task.md5, "Content-MD5", True)
    task.error = TaskError("timeout", "no data")
    task.finished_at = task.created_at + dt.timedelta(seconds=3)
    doc = task.to_doc()
    assert doc["_id"] == task.id and doc["status"] == "done"
    assert doc["notification"]["status"] == "pending"
    assert doc["expected"] == {"algorithm": "sha256", "hex": "ab" * 32}
    assert Task.from_doc(doc) == task


def test_a_document_from_before_digests_reads_as_an_md5_task():
    task = Task.new("http://h.test/f", None, mail_enabled=False)
    doc = task.to_doc()
    for name in ("algorithms", "digests", "expected", "verified", "server_digest"):
        del doc[name]
    doc.update(status="done", md5="d41d8cd98f00b204e9800998ecf8427e")
    old = Task.from_doc(doc)
    assert old.algorithms == ["md5"] and old.digests == {"md5": doc["md5"]}
    assert check_view(old) == (200, {"md5": doc["md5"], "status": "done", "url": task.url})


def test_new_task_notification_status():
    assert Task.new("http://h/", None, True).notification.status == NoteStatus.NONE
    assert Task.new("http://h/", "a@b.c", True).notification.status == NoteStatus.PENDING
    assert Task.new("http://h/", "a@b.c", False).notification.status == NoteStatus.SKIPPED


def test_views_keep_the_check_contract_and_hide_private_fields():
    task = Task.new("http://h.test/f", "secret@example.com", True, client="9.9.9.9")
    assert check_view(task) == (202, {"status": "running"})
    task.status, task.md5 = Status.DONE, "abc"
    assert check_view(task) == (200, {"md5": "abc", "status": "done", "url": "http://h.test/f"})
    task.status, task.md5, task.error = Status.FAILED, None, TaskError("dns", "no such host")
    assert check_view(task) == (502, {"status": "failed", "url": "http://h.test/f",
                                      "error": "no such host"})
    view = task_view(task)
    assert view["error_code"] == "dns" and view["notification"]["status"] == "pending"
    assert "secret@example.com" not in str(view) and "9.9.9.9" not in str(view)


def test_old_documents_without_new_fields_still_load():
    doc = {"_id": "x", "url": "http://h/", "status": "queued", "created_at": None}
    task = Task.from_doc(doc)
    assert task.notification == Notification() and task.lane == 0 and task.attempts == 0


# -- the hashing sink ---------------------------------------------------------

def _hex(algorithm: str, data: bytes) -> str:
    from service.model.digests import new_hash
    h = new_hash(algorithm)
    h.update(data)
    return h.hexdigest()


@pytest.mark.parametrize("sizes", [[0], [1], [BLOCK - 1, 1], [BLOCK, BLOCK, 7],
                                   [3 * BLOCK + 5], [1000] * 9000])
@pytest.mark.parametrize("algorithms", [["md5"], list(ALGORITHMS)])
def test_digest_sink_matches_hashlib(sizes, algorithms):
    chunks = [bytes([i % 251]) * n for i, n in enumerate(sizes)]

    async def run(executor):
        sink = DigestSink(algorithms, executor)
        for chunk in chunks:
            waiter = sink.feed(chunk)
            if waiter is not None:
                await waiter
        return await sink.hexdigests()

    data = b"".join(chunks)
    expected = {a: _hex(a, data) for a in algorithms}
    assert asyncio.run(run(None)) == expected
    with ThreadPoolExecutor(2) as pool:
        assert asyncio.run(run(pool)) == expected


def test_digest_sink_keeps_each_digest_in_order_with_many_blocks_in_flight():
    # A reader that never waits puts every block in flight at once: two
    # pool threads serve five digests, and each digest must still see its
    # blocks in order (consecutive updates on two threads would not).
    blocks = [bytes([i]) * BLOCK for i in range(12)]

    async def run(pool):
        sink = DigestSink(list(ALGORITHMS), pool)
        for block in blocks:
            sink.feed(block)
        return await sink.hexdigests()

    data = b"".join(blocks)
    with ThreadPoolExecutor(2) as pool:
        assert asyncio.run(run(pool)) == {a: _hex(a, data) for a in ALGORITHMS}


def test_digest_sink_holds_the_reader_once_depth_blocks_are_in_flight():
    gate = threading.Event()

    async def run(pool):
        sink = DigestSink(["md5"], pool)
        pool.submit(gate.wait)  # the only hashing thread is busy
        waits = [sink.feed(b"x" * BLOCK) is not None for _ in range(DEPTH + 1)]
        gate.set()
        await sink.hexdigests()
        return waits

    with ThreadPoolExecutor(1) as pool:
        assert asyncio.run(run(pool)) == [False] * (DEPTH - 1) + [True, True]


def test_digest_sink_takes_a_digest_only_before_the_first_byte():
    sink = DigestSink(["md5"], None)
    sink.add("sha256")
    sink.feed(b"abc")
    with pytest.raises(RuntimeError):
        sink.add("sha1")
    assert asyncio.run(sink.hexdigests())["sha256"] == hashlib.sha256(b"abc").hexdigest()


# -- mail error mapping -------------------------------------------------------

def _smtp_error(exc: Exception) -> MailError:
    """What Mailer makes of an SMTP failure, raised by a real smtplib call
    against a server that answers with it."""
    config = config_mod.load(None, {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": "1",
                                    "SMTP_TLS": "none"})
    mailer = Mailer(config)
    original = smtplib.SMTP

    class Failing(smtplib.SMTP):
        def __init__(self, *args, **kwargs):
            raise exc
    smtplib.SMTP = Failing  # type: ignore[misc]
    try:
        from email.message import EmailMessage
        with pytest.raises(MailError) as caught:
            mailer._send_blocking(EmailMessage())
        return caught.value
    finally:
        smtplib.SMTP = original  # type: ignore[misc]


@pytest.mark.parametrize("exc,permanent,start", [
    (smtplib.SMTPRecipientsRefused({"a@b.c": (550, b"no such user")}), True,
     "recipient refused: 550 no such user"),
    (smtplib.SMTPRecipientsRefused({"a@b.c": (450, b"mailbox busy")}), False,
     "recipient refused: 450 mailbox busy"),
    (smtplib.SMTPAuthenticationError(535, b"bad credentials"), True,
     "SMTP login refused: 535 bad credentials"),
    (smtplib.SMTPResponseException(421, b"try later"), False,
     "SMTP server answered 421 try later"),
    (smtplib.SMTPResponseException(554, b"rejected"), True,
     "SMTP server answered 554 rejected"),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), False,
     "could not reach SMTP server 127.0.0.1:1"),
    (TimeoutError("timed out"), False, "could not reach SMTP server 127.0.0.1:1"),
])
def test_mail_errors_map_to_permanent_or_retry(exc, permanent, start):
    error = _smtp_error(exc)
    assert error.permanent is permanent
    assert str(error).startswith(start)


def test_mail_really_refused_by_a_closed_port():
    """No substitution: a real connection to a closed port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = config_mod.load(None, {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(port),
                                    "SMTP_TLS": "none", "SMTP_TIMEOUT": "2"})
    task = Task.new("http://h/", "a@b.c", True)
    with pytest.raises(MailError) as caught:
        asyncio.run(Mailer(config).send(task))
    assert not caught.value.permanent
    assert str(caught.value).startswith(f"could not reach SMTP server 127.0.0.1:{port}")


# -- claim races on the real database ----------------------------------------

def test_two_claimers_one_task(mongo):
    """Many rounds of two stores (two workers' connections) claiming at
    once: each task is taken by exactly one of them."""
    config = config_mod.load(None, {"LEASE_SECONDS": "30"})

    async def main():
        uri = f"{mongo}/t_claim_{uuid.uuid4().hex[:8]}"
        a, b = open_store(config, uri), open_store(config, uri)
        try:
            await a.ensure_indexes()
            for _ in range(20):
                task = Task.new("http://h.test/x", None, False)
                await a.records.create(task)
                got_a, got_b = await asyncio.gather(a.queue.claim("A", 4),
                                                    b.queue.claim("B", 4))
                ids = [t.id for t in got_a + got_b]
                assert ids == [task.id], (got_a, got_b)
                winner = "A" if got_a else "B"
                stored = await a.records.get(task.id)
                assert stored.status == Status.RUNNING and stored.worker == winner
                assert stored.attempts == 1
                loser = b if winner == "A" else a
                assert await loser.queue.finish(stored, "B" if winner == "A" else "A",
                                                digests={"md5": "x"}) is None
                assert await a.queue.finish(stored, winner, digests={"md5": "y"}) == []
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


async def _claimed(store, n: int) -> list[Task]:
    """``n`` new tasks, claimed by worker W."""
    await store.ensure_indexes()
    for _ in range(n):
        await store.records.create(Task.new("http://h.test/x", None, False))
    return await store.queue.claim("W", n)


def test_ends_written_together_fail_alone(mongo):
    """Ends that share a write: one that cannot be stored (a lone surrogate
    in its message) fails by itself, the others are recorded, and an end
    no longer held (taken over) says so."""
    config = config_mod.load(None, {"LEASE_SECONDS": "30"})

    async def main():
        store = open_store(config, f"{mongo}/t_ends_{uuid.uuid4().hex[:8]}")
        try:
            tasks = await _claimed(store, 4)
            assert len(tasks) == 4
            tasks[3].claim = "someone else's"
            outcomes = await asyncio.gather(
                store.queue.finish(tasks[0], "W", digests={"md5": "a"}),
                store.queue.finish(tasks[1], "W", error=TaskError("x", "bad \ud800 text")),
                store.queue.finish(tasks[2], "W", digests={"md5": "c"}),
                store.queue.finish(tasks[3], "W", digests={"md5": "d"}),
                return_exceptions=True)
            assert outcomes[0] == [] and outcomes[2] == [] and outcomes[3] is None
            assert isinstance(outcomes[1], Exception)
            stored = [await store.records.get(t.id) for t in tasks]
            assert [t.status for t in stored] == [Status.DONE, Status.RUNNING, Status.DONE,
                                                  Status.RUNNING]
        finally:
            await store.close()

    asyncio.run(main())


def test_ends_written_together_say_which_were_still_held(mongo):
    """Ends that share one write, one of them taken over by another
    worker: the others are recorded, that one is not, and each end says
    which it was."""
    config = config_mod.load(None, {"LEASE_SECONDS": "30"})

    async def main():
        store = open_store(config, f"{mongo}/t_held_{uuid.uuid4().hex[:8]}")
        try:
            tasks = await _claimed(store, 3)
            tasks[1].claim = "someone else's"
            outcomes = await asyncio.gather(*(
                store.queue.finish(t, "W", digests={"md5": f"{n}" * 32})
                for n, t in enumerate(tasks)))
            assert outcomes == [[], None, []]
            stored = [await store.records.get(t.id) for t in tasks]
            assert [t.status for t in stored] == [Status.DONE, Status.RUNNING, Status.DONE]
            assert stored[2].md5 == "2" * 32 and stored[2].history[-1]["outcome"] == "done"
        finally:
            await store.close()

    asyncio.run(main())


def test_an_end_names_the_submits_that_joined_its_download(mongo):
    """A leader's end is conditioned on the followers it names: one that
    joined before it (after the end was prepared) is named by the end and
    settled with its result; one that comes after is refused by the join's
    condition and runs on its own, never given a download that ended
    before it was submitted."""
    config = config_mod.load(None, {"LEASE_SECONDS": "30"})

    async def main():
        store = open_store(config, f"{mongo}/t_join_{uuid.uuid4().hex[:8]}")
        try:
            (leader,) = await _claimed(store, 1)
            joined = []
            for _ in range(2):
                early = Task.new(leader.url, None, False)
                early.follow(leader.id)
                await store.records.create(early)
                assert await store.coalescer.join(early, leader.id)
                joined.append(early.id)
            assert await store.queue.finish(leader, "W", digests={"md5": "a" * 32}) == joined
            late = Task.new(leader.url, None, False)
            late.follow(leader.id)
            await store.records.create(late)
            assert not await store.coalescer.join(late, leader.id)
            freed = await store.records.get(late.id)
            assert freed.follows is None and freed.lease_until is not None
            ended = await store.records.get(leader.id)
            assert await store.coalescer.settle_followers(ended, joined) == 2
            for task_id in joined:
                follower = await store.records.get(task_id)
                assert follower.status == Status.DONE and follower.md5 == "a" * 32
        finally:
            await store.close()

    asyncio.run(main())


def test_file_records_written_together_keep_the_newest(mongo):
    """Records of files seen before replace theirs, new ones are added, and
    of two ends of one file in one write the later wins."""
    config = config_mod.load(None, {})

    async def main():
        store = open_store(config, f"{mongo}/t_files_{uuid.uuid4().hex[:8]}")
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)

        def record(task: Task, md5: str, etag: str | None = None) -> KnownFile:
            return KnownFile(task=task.id, at=now, digests={"md5": md5}, etag=etag)

        try:
            old, new, twice = (Task.new(f"http://h.test/{name}", None, False)
                               for name in ("old", "new", "twice"))
            await store.known_files.remember(old, record(old, "1" * 32, etag='"a"'))
            await asyncio.gather(
                store.known_files.remember(old, record(old, "2" * 32)),
                store.known_files.remember(new, record(new, "3" * 32)),
                store.known_files.remember(twice, record(twice, "4" * 32)),
                store.known_files.remember(twice, record(twice, "5" * 32)))
            got = [await store.known_files.get(t.url, t.algorithms) for t in (old, new, twice)]
            assert [k.digests["md5"] for k in got] == ["2" * 32, "3" * 32, "5" * 32]
            assert got[0].etag is None  # replaced, not merged with the first
        finally:
            await store.close()

    asyncio.run(main())


# -- one retry policy ---------------------------------------------------------

def test_backoff_doubles_up_to_its_cap():
    policy = Backoff(first=0.5, cap=3.0)
    assert [policy.delay(n) for n in range(0, 6)] == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0]
    jittered = Backoff(first=1.0, cap=10.0, jitter=0.5)
    assert all(0.5 * 2 ** (n - 1) <= jittered.delay(n) <= 2 ** (n - 1) for n in range(1, 4))


# -- ended tasks' /check answers ------------------------------------------------

def test_check_answers_keep_the_newest_and_forget_the_old():
    answers = CheckAnswers(max_entries=2, keep_seconds=60)
    for n in range(3):
        answers.ended(f"t{n}", 200, {"n": n})
    assert answers.get("t0") is None and answers.get("t2") == (200, {"n": 2})
    stale = CheckAnswers(keep_seconds=-1)
    stale.ended("t", 502, {})
    assert stale.get("t") is None and len(stale) == 0


def test_an_unfinished_answer_is_brief_and_never_hides_an_end():
    answers = CheckAnswers(fresh_seconds=60)
    answers.unfinished("t")
    assert answers.get("t") == (202, {"status": "running"})
    answers.ended("t", 200, {"md5": "x"})
    answers.unfinished("t")  # a read that raced the end's report
    assert answers.get("t") == (200, {"md5": "x"})
    answers.forget("t")
    assert answers.get("t") is None
    brief = CheckAnswers(fresh_seconds=-1)
    brief.unfinished("t")
    assert brief.get("t") is None


def test_an_empty_query_is_the_same_file_as_none_as_on_the_wire():
    from service.model.same_file import normalized_url
    assert normalized_url("http://H.example/g.bin?") == normalized_url("http://h.example/g.bin")
    assert normalized_url("http://h.example?") == "http://h.example/"
    assert normalized_url("http://h.example/g.bin?a") != normalized_url("http://h.example/g.bin")
    assert normalized_url("http://h.example/G.bin") != normalized_url("http://h.example/g.bin")


@pytest.mark.parametrize("text, number", [
    ("0", 0), ("42", 42), ("²", None), ("٣", None), ("５", None), ("1_0", None),
    ("+5", None), (" 5", None), ("", None), (None, None), ("9" * 31, None)])
def test_whole_numbers_are_ascii_digits_only(text, number):
    from service.model.numbers import whole_number
    assert whole_number(text) == number


def test_retry_after_with_a_superscript_digit_is_ignored_not_a_crash():
    from service.fetch.client import retry_after_seconds
    assert retry_after_seconds("²") is None and retry_after_seconds("7") == 7.0


def test_a_held_sink_hashes_chunks_fed_meanwhile_in_their_order():
    # Several connections (a segmented download) feed one sink while it
    # waits for a multipart probe: the order of the file must hold.
    from service.fetch.hashing import DigestSink

    async def run(resumable: bool) -> str:
        sink = DigestSink(["md5"], ThreadPoolExecutor(2))
        if resumable:
            sink.make_resumable()
        gate = asyncio.get_running_loop().create_future()
        sink.hold(gate)
        waits = [sink.feed(bytes([i]) * 100_000) for i in range(5)]
        assert all(w is not None for w in waits)
        gate.set_result(None)
        await asyncio.gather(*waits)
        return (await sink.hexdigests())["md5"]

    want = hashlib.md5(b"".join(bytes([i]) * 100_000 for i in range(5))).hexdigest()
    assert asyncio.run(run(False)) == want and asyncio.run(run(True)) == want
