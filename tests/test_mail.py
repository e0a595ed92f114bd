"""Notification mail through a real SMTP server: content, TLS, AUTH,
retries while the server is down, no retry storm on 550, exactly-once in
the normal case."""

from __future__ import annotations

import os
import signal
import time

import pytest

from fileserver import md5_of
from servicectl import free_port
from smtpserver import Inbox, SMTPServer, self_signed


def wait_for(predicate, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def smtp():
    server = SMTPServer(free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def mail_service(make_service, smtp):
    return make_service(SMTP_HOST="127.0.0.1", SMTP_PORT=str(smtp.controller.port),
                        SMTP_TLS="none", MAIL_FROM="md5@service.test", WORKERS="1")


def test_done_mail_names_url_and_md5(mail_service, smtp, files):
    url = files.url("/bytes/4321")
    task_id = mail_service.submit(url, email="user@example.com")
    mail_service.wait(task_id)
    wait_for(lambda: smtp.messages, what="mail")
    msg = smtp.messages[0]
    md5 = md5_of(4321)
    assert msg["To"] == "user@example.com"
    assert msg["From"] == "md5@service.test"
    assert msg["Date"] and msg["Message-ID"]
    assert md5 in msg["Subject"] and url in msg["Subject"]
    text = msg.get_content()
    assert url in text and md5 in text
    wait_for(lambda: mail_service.task(task_id)["notification"]["status"] == "sent")
    note = mail_service.task(task_id)["notification"]
    assert note["attempts"] == 1 and note["sent_at"]


def test_failed_mail_names_url_and_reason(mail_service, smtp, files):
    url = files.url("/status/404")
    task_id = mail_service.submit(url, email="user@example.com")
    mail_service.wait(task_id)
    wait_for(lambda: smtp.messages, what="mail")
    msg = smtp.messages[0]
    assert msg["Subject"] == f"MD5 failed for {url}"
    assert "HTTP 404 Not Found from 127.0.0.1" in msg.get_content()


def test_header_injection_through_email_is_refused(mail_service):
    import requests
    r = requests.post(mail_service.base + "/submit",
                      data={"url": "http://a.example/", "email": "a@b.com\r\nBcc: x@evil.com"})
    assert r.status_code == 400


def test_no_email_sends_nothing(mail_service, smtp, files):
    task_id = mail_service.submit(files.url("/bytes/11"))
    mail_service.wait(task_id)
    time.sleep(1.5)
    assert smtp.messages == []
    assert mail_service.task(task_id)["notification"]["status"] == "none"


@pytest.mark.parametrize("mode", ["starttls", "ssl"])
def test_tls_with_self_signed_cert_and_auth(make_service, files, tmp_path, mode):
    certs = self_signed(tmp_path)
    server = SMTPServer(free_port(), tls=mode, certs=certs,
                        credentials=("mailer", "s3cret")).start()
    try:
        svc = make_service(SMTP_HOST="localhost", SMTP_PORT=str(server.controller.port),
                           SMTP_TLS=mode, SMTP_USER="mailer", SMTP_PASSWORD="s3cret",
                           SMTP_CA_FILE=str(certs[0]), WORKERS="1")
        task_id = svc.submit(files.url("/bytes/99"), email="tls@example.com")
        svc.wait(task_id)
        wait_for(lambda: server.messages, what=f"mail over {mode}")
        assert md5_of(99) in server.messages[0].get_content()
        # The server has the mail before the service has written down that it went.
        wait_for(lambda: svc.task(task_id)["notification"]["status"] == "sent", what="sent status")
    finally:
        server.stop()


def test_wrong_password_fails_without_retry(make_service, files, tmp_path):
    certs = self_signed(tmp_path)
    server = SMTPServer(free_port(), tls="starttls", certs=certs,
                        credentials=("mailer", "s3cret")).start()
    try:
        svc = make_service(SMTP_HOST="localhost", SMTP_PORT=str(server.controller.port),
                           SMTP_TLS="starttls", SMTP_USER="mailer", SMTP_PASSWORD="wrong",
                           SMTP_CA_FILE=str(certs[0]), WORKERS="1")
        task_id = svc.submit(files.url("/bytes/9"), email="x@example.com")
        svc.wait(task_id)
        wait_for(lambda: svc.task(task_id)["notification"]["status"] == "failed")
        note = svc.task(task_id)["notification"]
        assert note["attempts"] == 1 and note["error"].startswith("SMTP login refused: 535")
        assert svc.task(task_id)["status"] == "done"  # the task never depends on mail
    finally:
        server.stop()


def test_untrusted_certificate_is_not_accepted(make_service, files, tmp_path):
    certs = self_signed(tmp_path)
    server = SMTPServer(free_port(), tls="starttls", certs=certs).start()
    try:
        svc = make_service(SMTP_HOST="localhost", SMTP_PORT=str(server.controller.port),
                           SMTP_TLS="starttls", MAIL_MAX_ATTEMPTS="2", WORKERS="1")
        task_id = svc.submit(files.url("/bytes/8"), email="x@example.com")
        wait_for(lambda: svc.task(task_id)["notification"]["status"] == "failed", timeout=30)
        assert "TLS" in svc.task(task_id)["notification"]["error"]
        assert server.messages == []
    finally:
        server.stop()


def test_550_fails_once_without_retry_storm(make_service, files):
    server = SMTPServer(free_port(), inbox=Inbox(refuse_with="550 5.1.1 No such user")).start()
    try:
        svc = make_service(SMTP_HOST="127.0.0.1", SMTP_PORT=str(server.controller.port),
                           SMTP_TLS="none", WORKERS="1")
        task_id = svc.submit(files.url("/bytes/7"), email="nobody@example.com")
        svc.wait(task_id)
        wait_for(lambda: svc.task(task_id)["notification"]["status"] == "failed")
        time.sleep(2)  # several retry periods (MAIL_RETRY_BASE is 0.5 s here)
        note = svc.task(task_id)["notification"]
        assert note["attempts"] == 1
        assert note["error"] == "recipient refused: 550 5.1.1 No such user"
    finally:
        server.stop()


def test_server_down_then_up_delivers_once(make_service, files):
    port = free_port()
    svc = make_service(SMTP_HOST="127.0.0.1", SMTP_PORT=str(port), SMTP_TLS="none",
                       WORKERS="1")
    task_id = svc.submit(files.url("/bytes/6"), email="later@example.com")
    svc.wait(task_id)
    wait_for(lambda: svc.task(task_id)["notification"]["attempts"] >= 2, what="retries")
    note = svc.task(task_id)["notification"]
    assert note["status"] == "pending" and "could not reach SMTP server" in note["error"]
    server = SMTPServer(port).start()
    try:
        wait_for(lambda: server.messages, timeout=30, what="late mail")
        time.sleep(3)
        assert len(server.messages) == 1
        wait_for(lambda: svc.task(task_id)["notification"]["status"] == "sent", what="sent status")
    finally:
        server.stop()


def test_worker_crash_before_mail_does_not_lose_it(make_service, files):
    """The worker that finished the task dies before the mail is sent; the
    replacement worker sends it."""
    port = free_port()
    svc = make_service(SMTP_HOST="127.0.0.1", SMTP_PORT=str(port), SMTP_TLS="none",
                       SMTP_TIMEOUT="1", WORKERS="1", MAIL_RETRY_BASE="1")
    task_id = svc.submit(files.url("/bytes/5"), email="crash@example.com")
    svc.wait(task_id)
    wait_for(lambda: svc.task(task_id)["notification"]["attempts"] >= 1)
    pid = [int(line.rsplit("pid ", 1)[1].rstrip(")")) for line in svc.log().splitlines()
           if "started (pid" in line][-1]
    os.kill(pid, signal.SIGKILL)
    server = SMTPServer(port).start()
    try:
        wait_for(lambda: server.messages, timeout=60, what="mail after crash")
        time.sleep(2)
        assert len(server.messages) == 1
        assert "crash@example.com" == server.messages[0]["To"]
    finally:
        server.stop()


def test_100_tasks_give_exactly_100_mails(make_service, smtp, files):
    svc = make_service(SMTP_HOST="127.0.0.1", SMTP_PORT=str(smtp.controller.port),
                       SMTP_TLS="none", WORKERS="2")
    ids = [svc.submit(files.url(f"/bytes/{100 + i}?seed={i}"), email=f"u{i}@example.com")
           for i in range(100)]
    svc.wait_all(ids)
    wait_for(lambda: len(smtp.messages) >= 100, timeout=60, what="100 mails")
    time.sleep(2)
    assert len(smtp.messages) == 100
    assert sorted(m["To"] for m in smtp.messages) == sorted(f"u{i}@example.com"
                                                            for i in range(100))
    for msg in smtp.messages:
        i = int(msg["To"][1:].split("@")[0])
        assert md5_of(100 + i, i) in msg.get_content()


def test_mail_off_records_skipped(service, files):
    task_id = service.submit(files.url("/bytes/3"), email="off@example.com")
    service.wait(task_id)
    assert service.task(task_id)["notification"]["status"] == "skipped"
