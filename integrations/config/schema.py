"""The parts of the services file every kind shares, and its ``webhooks:`` and ``mailboxes:``
sections. Each kind's own fields live with the kind (``integrations.services.<kind>``)."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from integrations.config.secrets import Secret, non_empty

#: Names of services, sources, mailboxes and agents' tool sets in the services file.
NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)/([smh])$")


class Strict(BaseModel):
    """A section of the services file: unknown fields are errors, and it never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


RequiredSecret = Annotated[Secret, AfterValidator(non_empty)]


@dataclass(frozen=True)
class Rate:
    per_second: float
    burst: int


def parse_rate(spec: str | None, burst: int = 1) -> Rate | None:
    """``"20/s"``, ``"100/m"``, ``"5000/h"`` -> :class:`Rate`; ``None`` -> ``None``."""
    if spec is None:
        return None
    m = _RATE.match(spec)
    if not m:
        raise ValueError("must look like 10/s, 100/m or 5000/h")
    per_second = float(m.group(1)) / {"s": 1, "m": 60, "h": 3600}[m.group(2)]
    if per_second <= 0:
        raise ValueError("must be above zero (leave it out for no limit)")
    return Rate(per_second, burst)


def check_rate(spec: str | None) -> str | None:
    parse_rate(spec)
    return spec


RateSpec = Annotated[str | None, AfterValidator(check_rate)]


def check_url(url: str, *, what: str = "URL", path_allowed: bool = True, query_allowed: bool = False) -> str:
    """An ``http(s)://host[:port][/path]`` URL with no user name, password, query (unless
    ``query_allowed``) or fragment.

    Raises ``ValueError`` naming what is wrong, never the URL (it may hold a password)."""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError(f"{what} must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"{what} has a malformed host or port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be http:// or https:// with a host")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError(f"{what} must not contain a user name or password (put credentials in auth:)")
    if parts.fragment or url.endswith("#"):
        raise ValueError(f"{what} must not have a fragment")
    if not query_allowed and (parts.query or url.endswith("?")):
        raise ValueError(f"{what} must not have a query string")
    if port == 0:
        raise ValueError(f"{what} has a port out of range")
    if not path_allowed and parts.path not in ("", "/"):
        raise ValueError(f"{what} must not have a path")
    return url


class RetryPolicy(Strict):
    """Celery's own retry options, per service: ``retry_backoff`` is ``backoff`` seconds doubled
    on each retry, capped at ``backoff_max``, with full jitter when ``jitter`` is set."""

    max_retries: int = Field(5, ge=0, le=100)
    backoff: int = Field(2, ge=1, le=3600)
    backoff_max: int = Field(300, ge=1)
    jitter: bool = True
    #: The longest ``Retry-After`` honoured as given; longer waits are cut to this.
    retry_after_max: int = Field(300, ge=1)


class Breaker(Strict):
    """Open after ``threshold`` consecutive failures; probe again after ``reset_timeout`` s."""

    threshold: int = Field(5, ge=1, le=1000)
    reset_timeout: float = Field(30, gt=0, le=3600)


class HealthCheck(Strict):
    """How beat checks a service: one of its ``operation``s (with ``params``), for an HTTP
    service a GET of ``path``, or, with neither, the kind's own protocol check (SQL ``select 1``,
    S3 ``HeadBucket``, SMTP ``NOOP``, a files root that exists), every ``interval`` seconds."""

    operation: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    path: str | None = Field(None, pattern=r"^/")
    interval: float = Field(60, ge=1, le=86400)
    enabled: bool = True

    @model_validator(mode="after")
    def _one_target(self) -> HealthCheck:
        if self.operation is not None and self.path is not None:
            raise ValueError("set one of operation or path, not both")
        if self.params and self.operation is None:
            raise ValueError("params go with an operation")
        return self


class WebhookSource(Strict):
    """A sender of webhooks, received at ``POST /webhooks/{name}``.

    While a secret is being rotated, put the old one in ``previous_secret``: a delivery signed
    with either is accepted. Standard Webhooks secrets are ``whsec_`` followed by base64, and
    ``secret`` may also list several of them separated by spaces.
    """

    name: str
    type: Literal["github", "slack", "standard"]
    secret: RequiredSecret
    previous_secret: RequiredSecret | None = None

    @property
    def secrets(self) -> list[bytes]:
        """The signing keys, as bytes (``whsec_`` secrets decoded)."""
        given = [s.get().strip() for s in (self.secret, self.previous_secret) if s is not None]
        if self.type == "standard":
            return [base64.b64decode(p.removeprefix("whsec_")) for v in given for p in v.split()]
        return [v.encode() for v in given if v]

    @field_validator("secret", "previous_secret")
    @classmethod
    def _standard_form(cls, v: Secret | None, info: ValidationInfo) -> Secret | None:
        if v is None or not v.available or info.data.get("type") != "standard":
            return v
        for part in v.get().split():
            try:
                if not part.startswith("whsec_") or not base64.b64decode(part[6:], validate=True):
                    raise ValueError
            except (ValueError, binascii.Error):
                raise ValueError("Standard Webhooks secrets look like whsec_<base64>") from None
        return v


class Mailbox(Strict):
    """An IMAP mailbox beat polls every ``interval`` seconds for new messages.

    TLS (IMAPS, port 993) unless ``tls: false``, which is only allowed for a loopback host.
    """

    name: str
    host: str = Field(min_length=1)
    port: int = Field(993, ge=1, le=65535)
    tls: bool = True
    username: str = Field(min_length=1)
    password: Secret
    folder: str = Field("INBOX", min_length=1)
    interval: float = Field(60, ge=1, le=86400)
    timeout: float = Field(30, gt=0, le=300)
    enabled: bool = True
    #: The first poll dispatches the messages already in the folder; with ``false`` it only
    #: notes where the folder ends, and only mail arriving after it is dispatched.
    read_existing: bool = True

    @model_validator(mode="after")
    def _tls_off_loopback(self) -> Mailbox:
        if not self.tls and not is_loopback(self.host):
            raise ValueError("tls: plain IMAP is allowed only on a loopback host")
        return self


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False
