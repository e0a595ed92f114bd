"""A real SMTP server (aiosmtpd) on 127.0.0.1 that keeps what it receives."""

from __future__ import annotations

import email
import email.policy
import ssl
import subprocess
import threading
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Inbox:
    """The handler: records each message; can refuse recipients with a code."""

    def __init__(self, refuse_with: str | None = None):
        self.messages: list[email.message.EmailMessage] = []
        self.refuse_with = refuse_with
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.refuse_with:
            return self.refuse_with
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.lock:
            self.messages.append(msg)
        return "250 Message accepted for delivery"


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    if not cert.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True)
    return cert, key


class SMTPServer:
    def __init__(self, port: int, inbox: Inbox | None = None, tls: str = "none",
                 certs: tuple[Path, Path] | None = None,
                 credentials: tuple[str, str] | None = None):
        self.inbox = inbox or Inbox()
        kwargs: dict = {}
        context = None
        if certs is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*map(str, certs))
        if tls == "starttls":
            kwargs.update(tls_context=context, require_starttls=True)
        if credentials is not None:
            kwargs.update(authenticator=self._authenticator(credentials),
                          # implicit TLS is invisible to aiosmtpd's own check
                          auth_required=True, auth_require_tls=tls == "starttls")
        self.controller = Controller(self.inbox, hostname="127.0.0.1", port=port,
                                     ssl_context=context if tls == "ssl" else None,
                                     server_hostname="localhost", **kwargs)

    @staticmethod
    def _authenticator(credentials):
        def check(server, session, envelope, mechanism, auth_data):
            ok = (isinstance(auth_data, LoginPassword)
                  and (auth_data.login.decode(), auth_data.password.decode()) == credentials)
            return AuthResult(success=ok, handled=False)
        return check

    def start(self) -> "SMTPServer":
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    @property
    def messages(self):
        return self.inbox.messages
