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
from service.model.task import Status, Task


@dataclass
class MailError(Exception):
    message: str
    permanent: bool

    def __str__(self) -> str:
        return self.message


def build_message(config: Config, task: Task) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = config.mail_from
    msg["To"] = task.email
    msg["Date"] = email.utils.formatdate(localtime=False, usegmt=True)
    domain = config.mail_from.rpartition("@")[2] or "localhost"
    msg["Message-ID"] = email.utils.make_msgid("md5-light", domain=domain)
    # Lets a receiving system see retries of one notification as one mail.
    msg["X-md5-light-Task"] = task.id
    url = task.url
    if task.status == Status.DONE:
        msg["Subject"] = f"MD5 {task.md5} for {_short(url)}"
        body = (f"The file at\n\n  {url}\n\nhas the MD5 checksum\n\n  {task.md5}\n\n"
                f"Task: {task.id}\n")
    elif task.status == Status.CANCELLED:  # only when the cancel asked for a mail
        msg["Subject"] = f"MD5 cancelled for {_short(url)}"
        body = (f"The MD5 of\n\n  {url}\n\nwas not computed: the task was cancelled.\n\n"
                f"Task: {task.id}\n")
    else:
        reason = task.error.message if task.error else "unknown error"
        msg["Subject"] = f"MD5 failed for {_short(url)}"
        body = (f"The MD5 of\n\n  {url}\n\ncould not be computed:\n\n  {reason}\n\n"
                f"Task: {task.id}\n")
    msg.set_content(body, charset="utf-8")
    return msg


def _short(url: str, limit: int = 120) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."


class Mailer:
    def __init__(self, config: Config, executor: Executor | None = None):
        self.config = config
        self.executor = executor

    @property
    def enabled(self) -> bool:
        return self.config.mail_enabled

    async def send(self, task: Task) -> None:
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
