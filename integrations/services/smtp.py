"""Email out over SMTP: the ``smtp`` kind, with one operation, ``send``.

::

    services:
      mail_out:
        kind: smtp
        host: smtp.example.com
        security: starttls            # or tls (implicit, port 465); plain only to a loopback host
        username: agent@example.com
        password: ${SMTP_PASSWORD}

One attempt is one connection: connect (to the address the SSRF guard judged), EHLO, STARTTLS
with the certificate verified against the host name (or implicit TLS), EHLO again, AUTH, then
MAIL, RCPT for each recipient, DATA, QUIT. The Message-ID is ``<job-id@domain>``, the same on
every attempt of a job. The job keeps the final reply code, the Message-ID and the recipients
the server refused (``meta``).

Replies are classified in one place (:func:`reply_error`, :func:`connection_error`): 421, 450,
451 and 452 and a lost connection are transient; every other 4xx and 5xx is permanent, with
the server's text (bounded, credentials masked). Some recipients refused and others accepted
is a success for those accepted.
"""

from __future__ import annotations

import contextlib
import functools
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator, Mapping
from ipaddress import IPv4Network, IPv6Network, ip_address
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from integrations import redact, ssrf
from integrations.config import get_settings
from integrations.config.schema import RequiredSecret, is_loopback
from integrations.errors import CallError, ConfigError, PermanentError, TransientError
from integrations.services.base import Attempt, Operation, Outcome, Service
from integrations.services.smtp_message import Envelope, SendOperation, build, message_id

Security = Literal["starttls", "tls", "plain"]
DEFAULT_PORTS: dict[str, int] = {"starttls": 587, "tls": 465, "plain": 25}
#: Replies that say "try again later" (RFC 5321 4.2.2, 4.2.3); any other 4xx or 5xx is final.
TRANSIENT_CODES = frozenset({421, 450, 451, 452})
#: Characters of a server's reply kept in an error or on the job.
REPLY_MAX = 300


class SmtpService(Service):
    health_own_check: ClassVar[bool] = True

    kind: Literal["smtp"] = "smtp"
    host: str = Field(min_length=1, max_length=253)
    #: Default: 587 for starttls, 465 for tls, 25 for plain.
    port: int | None = Field(None, ge=1, le=65535)
    security: Security = "starttls"
    username: str | None = Field(None, min_length=1)
    password: RequiredSecret | None = None
    #: A CA bundle to trust instead of the system's (a server behind a private CA).
    ca_bundle: Path | None = None
    #: Allow a loopback, private or link-local server (off: the SSRF guard refuses them).
    allow_private_network: bool = False
    allowed_networks: tuple[IPv4Network | IPv6Network, ...] = ()
    #: The attachments of one message, decoded, in bytes at most (checked at submit).
    attachments_max_bytes: int = Field(10 * 1024 * 1024, ge=0, le=100 * 1024 * 1024)
    #: The addresses (``ada@example.com``) and whole domains (``@example.com``) a message may be
    #: from; empty: any the server accepts (an agent could then send as anyone the relay allows).
    senders: tuple[str, ...] = ()
    #: The domain of Message-IDs (default: the sender's).
    message_id_domain: str | None = Field(None, pattern=r"^[A-Za-z0-9.-]{1,253}$")
    #: The name given in EHLO (default: this machine's fully qualified name).
    local_hostname: str | None = Field(None, pattern=r"^[A-Za-z0-9.-]{1,253}$")

    _ops: dict[str, Operation] | None = PrivateAttr(default=None)

    @field_validator("host")
    @classmethod
    def _host_form(cls, v: str) -> str:
        if any(c.isspace() or c in "/@[]" for c in v) or (":" in v and not _is_ip(v)):
            raise ValueError("a host name or an IP address (no scheme, port, brackets or user)")
        return v

    @field_validator("ca_bundle")
    @classmethod
    def _ca_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError("no such file")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SmtpService:
        if self.security == "plain" and not is_loopback(self.host):
            raise ValueError("security: plain SMTP is allowed only to a loopback host")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self

    @property
    def effective_port(self) -> int:
        return self.port or DEFAULT_PORTS[self.security]

    # ---- the contract ------------------------------------------------------------------------

    def catalog(self) -> Mapping[str, Operation]:
        if self._ops is None:
            self._ops = {
                "send": SendOperation(attachments_max_bytes=self.attachments_max_bytes, senders=self.senders)
            }
        return self._ops

    def call(self, op: Operation, params: dict[str, Any], attempt: Attempt) -> Outcome:
        assert isinstance(op, SendOperation)
        msg_id = message_id(attempt.job_id, params, self.message_id_domain)
        envelope = build(params, msg_id)
        t0 = time.perf_counter()
        try:
            with self._errors(t0), self.connect() as smtp:
                code, reply, refused = transaction(smtp, envelope, self)
        except CallError as e:
            e.meta["message_id"] = msg_id  # a retry sends the same; downstream may have this one
            raise
        latency = (time.perf_counter() - t0) * 1000
        meta: dict[str, Any] = {"message_id": msg_id, "reply_code": code}
        if refused:
            meta["refused"] = refused
        gone = {r["address"] for r in refused}
        accepted = [r for r in envelope.recipients if r not in gone]
        return Outcome(
            data={"message_id": msg_id, "accepted": accepted, "refused": refused, "reply": f"{code} {reply}"},
            status_code=code,
            latency_ms=latency,
            excerpt=f"{code} {reply}"[: get_settings().ledger_body_max_bytes],
            meta=meta,
        )

    def check_health(self) -> Outcome:
        """Connect, EHLO, STARTTLS and AUTH as a send would, then NOOP and QUIT."""
        if self.health is not None and self.health.operation is not None:
            return super().check_health()
        t0 = time.perf_counter()
        with self._errors(t0), self.connect() as smtp:
            code, text = smtp.noop()
            if code != 250:
                raise reply_error(code, text, self, "NOOP")
        return Outcome(status_code=code, latency_ms=(time.perf_counter() - t0) * 1000, excerpt=f"{code} NOOP")

    def describe(self) -> str:
        auth = f"auth as {self.username}" if self.username else "no auth"
        return f"smtp, {self.host}:{self.effective_port}, {self.security}, {auth}"

    # ---- the connection ----------------------------------------------------------------------

    @contextlib.contextmanager
    def connect(self) -> Iterator[smtplib.SMTP]:
        """A connection that has said EHLO, is encrypted as configured and logged in; QUIT on exit."""
        port = self.effective_port
        address = (
            self.host if self.allow_private_network else ssrf.resolve(self.host, port, self.allowed_networks)
        )
        try:
            context = ssl.create_default_context(cafile=str(self.ca_bundle) if self.ca_bundle else None)
        except (OSError, ValueError):
            raise PermanentError("ca_bundle: not a readable PEM file of certificates") from None
        ehlo = self.local_hostname or _fqdn()
        smtp: smtplib.SMTP
        if self.security == "tls":
            smtp = _GuardedSmtpTls(
                self.host, address, local_hostname=ehlo, timeout=self.timeout, context=context
            )
        else:
            smtp = _GuardedSmtp(self.host, address, local_hostname=ehlo, timeout=self.timeout)
        try:
            code, text = smtp.connect(self.host, port)
            if code != 220:
                raise reply_error(code, text, self, "greeting")
            smtp.ehlo()
            if self.security == "starttls":
                if not smtp.has_extn("starttls"):
                    raise PermanentError(f"{self.host} does not offer STARTTLS")
                code, text = smtp.starttls(context=context)
                if code != 220:
                    raise reply_error(code, text, self, "STARTTLS")
                smtp.ehlo()
            if self.username is not None and self.password is not None:
                if not smtp.has_extn("auth"):
                    raise PermanentError(f"{self.host} does not offer AUTH")
                try:
                    smtp.login(self.username, self.password.get())
                except smtplib.SMTPResponseException as e:
                    raise reply_error(e.smtp_code, e.smtp_error, self, "AUTH") from None
            yield smtp
        finally:
            with contextlib.suppress(OSError):  # smtplib's errors are OSErrors too
                smtp.quit()
            smtp.close()

    @contextlib.contextmanager
    def _errors(self, t0: float) -> Iterator[None]:
        """Every failure of an attempt as one of the project's errors, with its latency."""
        try:
            yield
        except CallError as e:
            e.latency_ms = (time.perf_counter() - t0) * 1000
            raise
        except ConfigError as e:  # the password's variable is not set in this process
            raise PermanentError(str(e)) from None
        except (OSError, smtplib.SMTPException) as e:
            err = connection_error(e, self)
            err.latency_ms = (time.perf_counter() - t0) * 1000
            # Not chained: the library's text is the server's, and may echo what we sent.
            raise err from None


def transaction(
    smtp: smtplib.SMTP, envelope: Envelope, svc: SmtpService
) -> tuple[int, str, list[dict[str, Any]]]:
    """MAIL, RCPT for each recipient, DATA: ``(final code, final text, refused recipients)``.

    Raises when the server refuses the sender, every recipient, or the message."""
    options = []
    if smtp.has_extn("size"):
        options.append(f"SIZE={len(envelope.data)}")
    if envelope.utf8:
        if not smtp.has_extn("smtputf8"):
            raise PermanentError(f"{svc.host} does not offer SMTPUTF8, which a non-ASCII address needs")
        options += ["SMTPUTF8", "BODY=8BITMIME"]
    code, text = smtp.mail(envelope.sender, options)
    if code != 250:
        raise reply_error(code, text, svc, "MAIL FROM")
    refused: list[dict[str, Any]] = []
    worst: tuple[int, bytes] | None = None
    for rcpt in envelope.recipients:
        code, text = smtp.rcpt(rcpt)
        if code == 421:  # the server is closing the connection
            raise reply_error(code, text, svc, "RCPT TO")
        if code not in (250, 251):
            refused.append({"address": rcpt, "code": code, "reply": _text(text, svc)})
            # A transient refusal of all of them makes the job worth retrying.
            if worst is None or code in TRANSIENT_CODES:
                worst = (code, text)
    if worst is not None and len(refused) == len(envelope.recipients):
        raise reply_error(worst[0], worst[1], svc, "RCPT TO (every recipient)")
    code, text = smtp.data(envelope.data)
    if code != 250:
        raise reply_error(code, text, svc, "DATA")
    return code, _text(text, svc), refused


def reply_error(code: int, text: bytes | str, svc: SmtpService, stage: str) -> CallError:
    """The error a negative reply stands for: transient for 421, 450, 451 and 452, permanent
    for any other (RFC 5321 4.2.1), with the server's text bounded and masked."""
    kind = TransientError if code in TRANSIENT_CODES else PermanentError
    said = _text(text, svc)
    return kind(
        f"{svc.host} refused {stage}: {code} {said}".rstrip(), status_code=code, excerpt=f"{code} {said}"
    )


def connection_error(e: BaseException, svc: SmtpService) -> CallError:
    """The error a failure without a usable reply stands for."""
    if isinstance(e, smtplib.SMTPResponseException):  # a negative reply smtplib raised itself
        return reply_error(e.smtp_code, e.smtp_error, svc, "the command")
    if isinstance(e, smtplib.SMTPNotSupportedError):
        return PermanentError(f"{svc.host} does not support a command we need")
    if isinstance(e, ssl.SSLCertVerificationError):
        return PermanentError(f"{svc.host}: TLS certificate not trusted (see ca_bundle)")
    if isinstance(e, socket.gaierror):
        return TransientError(f"{svc.host}: name not resolved")
    if isinstance(e, TimeoutError):
        return TransientError(f"{svc.host} did not answer within {svc.timeout}s")
    if isinstance(e, ConnectionRefusedError):
        return TransientError(f"{svc.host}: connection refused")
    if isinstance(e, ssl.SSLError):
        return TransientError(f"{svc.host}: TLS error")
    return TransientError(f"{svc.host}: connection dropped")


def _is_ip(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


def _text(text: bytes | str, svc: SmtpService) -> str:
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
    raw = redact.scrub(raw, svc.secret_values())
    return redact.redact(" ".join(raw.decode("utf-8", "replace").split()))[:REPLY_MAX]


@functools.cache
def _fqdn() -> str:
    """This machine's name for EHLO, looked up once (smtplib would on every connection)."""
    return socket.getfqdn()


class _GuardedSmtp(smtplib.SMTP):
    """Connects to ``address`` (what the SSRF guard judged); STARTTLS verifies ``host``'s name."""

    def __init__(self, host: str, address: str, **kwargs: Any) -> None:
        self._address = address
        super().__init__(**kwargs)
        self._host = host  # smtplib's STARTTLS checks the certificate against it

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return socket.create_connection((self._address, port), timeout, self.source_address)


class _GuardedSmtpTls(smtplib.SMTP_SSL):
    """The same with implicit TLS: the handshake verifies ``host``'s name."""

    def __init__(self, host: str, address: str, **kwargs: Any) -> None:
        self._address = address
        super().__init__(**kwargs)
        self._host = host

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((self._address, port), timeout, self.source_address)
        return self.context.wrap_socket(sock, server_hostname=self._host)
