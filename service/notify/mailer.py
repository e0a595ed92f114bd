"""Mail that tells a user their task ended.

``smtplib`` blocks, so every send runs in an executor thread. Messages are
built with ``EmailMessage``, whose header folding refuses CR/LF in header
values: nothing a user submits can inject a header.
"""

from __future__ import annotations

import asyncio
import email.utils
import smtplib
import ssl
from concurrent.futures import Executor
from dataclasses import dataclass
from email.message import EmailMessage

from service.config import Config
from service.model.manifest import Manifest
from service.model.task import Notifiable, Status, Task


@dataclass
class MailError(Exception):
    message: str
    permanent: bool

    def __str__(self) -> str:
        return self.message


def build_message(config: Config, task: Notifiable) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = config.mail_from
    msg["To"] = task.email
    msg["Date"] = email.utils.formatdate(localtime=False, usegmt=True)
    domain = config.mail_from.rpartition("@")[2] or "localhost"
    msg["Message-ID"] = email.utils.make_msgid("md5-light", domain=domain)
    # Lets a receiving system see retries of one notification as one mail.
    if isinstance(task, Manifest):
        msg["X-md5-light-Manifest"] = task.id
        subject, body = _manifest_summary(task)
        msg["Subject"] = subject
        msg.set_content(body + f"\nManifest: {task.id}\n", charset="utf-8")
        return msg
    assert isinstance(task, Task)
    msg["X-md5-light-Task"] = task.id
    subject, body = _subject_and_body(task)
    if task.server_digest is not None and task.status != Status.CANCELLED:
        body += f"\nThe server's own checksum: {task.server_digest.describe()}.\n"
    msg["Subject"] = subject
    msg.set_content(body + f"\nTask: {task.id}\n", charset="utf-8")
    return msg


def _subject_and_body(task: Task) -> tuple[str, str]:
    url, short = task.url, _short(task.url)
    if task.status == Status.DONE and task.digests.keys() <= {"md5"} and not task.expected:
        return (f"MD5 {task.md5} for {short}",
                f"The file at\n\n  {url}\n\nhas the MD5 checksum\n\n  {task.md5}\n")
    if task.status == Status.DONE:
        verdict = (f"It matches the expected {task.expected.algorithm} checksum.\n"
                   if task.expected else "")
        subject = f"Verified {short}" if task.expected else f"Checksums for {short}"
        return subject, (f"The file at\n\n  {url}\n\nhas the checksums\n\n"
                         f"{_digest_lines(task.digests)}\n{verdict}")
    if task.status == Status.CANCELLED:  # only when the cancel asked for a mail
        return (f"MD5 cancelled for {short}",
                f"The MD5 of\n\n  {url}\n\nwas not computed: the task was cancelled.\n")
    reason = task.error.message if task.error else "unknown error"
    if task.verified is False and task.expected:
        return (f"Checksum MISMATCH for {short}",
                f"The file at\n\n  {url}\n\ndoes NOT match the expected checksum:\n\n"
                f"  expected {task.expected}\n\nWhat was downloaded has the checksums\n\n"
                f"{_digest_lines(task.digests)}")
    return (f"MD5 failed for {short}",
            f"The MD5 of\n\n  {url}\n\ncould not be computed:\n\n  {reason}\n")


def _manifest_summary(manifest: Manifest) -> tuple[str, str]:
    totals = manifest.totals or {}
    ok, bad = totals.get("ok", 0), manifest.lines - totals.get("ok", 0)
    subject = (f"Manifest verified: all {ok} files OK" if not bad
               else f"Manifest: {bad} of {manifest.lines} files FAILED")
    counts = "".join(f"  {name:<9} {totals.get(name, 0)}\n"
                     for name in ("ok", "mismatch", "failed") if totals.get(name) or name == "ok")
    body = f"The manifest of {manifest.lines} files has been checked:\n\n{counts}"
    if manifest.problems:
        shown = "".join(f"  line {p['line']}: {p['url']}: {p['outcome'].upper()}"
                        f"{' (' + p['error'] + ')' if p.get('error') else ''}\n"
                        for p in manifest.problems)
        more = bad - len(manifest.problems)
        body += f"\nFiles that did not verify:\n\n{shown}"
        if more > 0:
            body += f"  ... and {more} more\n"
    return subject, body


def _digest_lines(digests: dict[str, str]) -> str:
    return "".join(f"  {algorithm:<8} {value}\n" for algorithm, value in digests.items())


def _short(url: str, limit: int = 120) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."


class Mailer:
    def __init__(self, config: Config, executor: Executor | None = None):
        self.config = config
        self.executor = executor

    @property
    def enabled(self) -> bool:
        return self.config.mail_enabled

    async def send(self, task: Notifiable) -> None:
        message = build_message(self.config, task)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._send_blocking, message)

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.config.smtp_ca_file)

    def _send_blocking(self, message: EmailMessage) -> None:
        cfg = self.config
        host = cfg.smtp_host or "localhost"  # only called with mail on, so it is set
        try:
            if cfg.smtp_tls == "ssl":
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(host, cfg.smtp_port,
                                                      timeout=cfg.smtp_timeout,
                                                      context=self._ssl_context())
            else:
                smtp = smtplib.SMTP(host, cfg.smtp_port, timeout=cfg.smtp_timeout)
            with smtp:
                if cfg.smtp_tls == "starttls":
                    smtp.starttls(context=self._ssl_context())
                if cfg.smtp_user:
                    smtp.login(cfg.smtp_user, cfg.smtp_password or "")
                smtp.send_message(message)
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            raise MailError(f"recipient refused: {code} {_text(text)}", code >= 500) from None
        except smtplib.SMTPAuthenticationError as exc:
            raise MailError(f"SMTP login refused: {exc.smtp_code} {_text(exc.smtp_error)}",
                            True) from None
        except smtplib.SMTPNotSupportedError as exc:
            raise MailError(f"SMTP server does not support this: {exc}", True) from None
        except smtplib.SMTPResponseException as exc:
            raise MailError(f"SMTP server answered {exc.smtp_code} {_text(exc.smtp_error)}",
                            exc.smtp_code >= 500) from None
        except ssl.SSLError as exc:
            raise MailError(f"TLS with the SMTP server failed: {exc.reason or exc}",
                            False) from None
        except (TimeoutError, smtplib.SMTPException, OSError) as exc:
            raise MailError(f"could not reach SMTP server {cfg.smtp_host}:{cfg.smtp_port}: "
                            f"{exc}", False) from None


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
