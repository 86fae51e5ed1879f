"""A real SMTP server for the tests: aiosmtpd on loopback, with STARTTLS (or implicit TLS) under
a CA the tests make, AUTH required, and a handler that keeps what arrived.

A test tells the handler, per recipient address, how to answer: a reply for RCPT (``550 ...``
refuses that recipient), and a list of steps for DATA, one per message (``451 ...`` for a
temporary failure, ``554 ...`` for a final one, ``drop`` to read the whole message, keep it,
and cut the connection before answering, as when a reply is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

HOST = "127.0.0.1"
USER = "agent"


@dataclass(frozen=True)
class Certs:
    ca: Path  # the test CA's certificate: the ca_bundle of the services
    cert: Path  # the server's, for localhost and 127.0.0.1, signed by the CA
    key: Path


def make_certs(folder: Path) -> Certs:
    """A CA and a server certificate it signs (EC P-256, two days), with the openssl command."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    cert, key, csr, ext = (
        folder / "server.pem",
        folder / "server.key",
        folder / "server.csr",
        folder / "ext.cnf",
    )
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    steps = [
        ["req", "-x509", *ec, "-days", "2", "-subj", "/CN=test CA", "-keyout", ca_key, "-out", ca,
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", *ec, "-subj", "/CN=localhost", "-keyout", key, "-out", csr],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
         "-out", cert, "-extfile", ext],
    ]  # fmt: skip
    for args in steps:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)
    return Certs(ca, cert, key)


@dataclass
class Arrived:
    """One message the server accepted (or kept before cutting the connection)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    login: str | None
    tls: bool
    reply: str

    @property
    def message(self) -> EmailMessage:
        m = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(m, EmailMessage)
        return m


@dataclass
class Handler:
    """What the server answers and what it kept. Read and changed from the tests' thread."""

    password: str
    arrived: list[Arrived] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_steps: dict[str, list[str]] = field(default_factory=dict)
    logins: list[tuple[str, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def to(self, address: str) -> list[Arrived]:
        with self.lock:
            return [a for a in self.arrived if address in a.rcpt_tos]

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        ok = auth_data.login.decode() == USER and auth_data.password.decode() == self.password
        with self.lock:
            self.logins.append((auth_data.login.decode(), ok))
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        with self.lock:
            reply = self.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        step = "250 2.0.0 OK: queued"
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                steps = self.data_steps.get(rcpt)
                if steps:
                    step = steps.pop(0)
                    break
            data = envelope.original_content or b""
            auth = session.auth_data
            login = auth.login.decode() if isinstance(auth, LoginPassword) else None
            # Encrypted by STARTTLS or from the start (implicit TLS).
            tls = server.transport is not None and server.transport.get_extra_info("ssl_object") is not None
            self.arrived.append(
                Arrived(str(envelope.mail_from), list(envelope.rcpt_tos), data, login, tls, step)
            )
        if step == "drop":
            assert isinstance(server.transport, asyncio.Transport)
            server.transport.abort()  # the message was read whole; its answer never leaves
        return step if step != "drop" else "250 2.0.0 OK"


@contextlib.contextmanager
def smtp_server(
    port: int, certs: Certs, handler: Handler, *, implicit_tls: bool = False
) -> Iterator[Controller]:
    """aiosmtpd on ``HOST:port`` answering through ``handler``: STARTTLS required before AUTH,
    AUTH required before MAIL (or implicit TLS with ``implicit_tls``). Stopped on exit."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert, certs.key)
    tls: dict[str, Any] = (
        {"ssl_context": context} if implicit_tls else {"tls_context": context, "require_starttls": True}
    )
    controller = Controller(
        handler,
        hostname=HOST,
        port=port,
        server_hostname="localhost",
        authenticator=handler.authenticate,
        auth_required=True,
        auth_require_tls=not implicit_tls,  # aiosmtpd counts only STARTTLS as TLS here
        ready_timeout=10,
        **tls,
    )
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()
