"""The one place where HTTP requests are made.

Every outgoing request goes through :func:`send`: a pooled session per service and thread, a
timeout, an SSRF guard applied to every hop (redirects included), a bounded body, and one
classification of the outcome into :mod:`integrations.errors`.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from integrations import redact
from integrations.auth import Auth, requests_auth
from integrations.errors import CallError, PermanentError, RateLimited, TransientError

USER_AGENT = "agent-integrations/0.1"


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    #: A raw body, sent as is (a signed webhook: the bytes signed are the bytes sent).
    content: bytes | None = None
    #: Off for webhooks: a redirect is the receiver's failure, not a place to re-post to.
    follow_redirects: bool = True


Network = IPv4Network | IPv6Network


class Peer(Protocol):
    """What :func:`send` needs to know about whom it talks to: a service, or the endpoints of
    outgoing webhooks."""

    @property
    def name(self) -> str: ...
    @property
    def timeout(self) -> float: ...
    @property
    def allow_private_network(self) -> bool: ...
    @property
    def allowed_networks(self) -> Sequence[Network]: ...
    @property
    def auth(self) -> Auth: ...
    @property
    def ca_bundle(self) -> Path | None: ...
    @property
    def headers(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class Response:
    status_code: int
    reason: str
    headers: dict[str, str]
    body: bytes
    latency_ms: float

    def data(self) -> Any:
        """The body as JSON when it says it is JSON, else as text (``None`` when empty)."""
        if not self.body:
            return None
        text = self.body.decode("utf-8", errors="replace")
        if "json" in self.headers.get("content-type", "").lower():
            try:
                return json.loads(text)
            except ValueError:
                return text
        return text

    def excerpt(self, limit: int) -> str | None:
        """At most ``limit`` bytes of the body, for the ledger."""
        if not self.body or limit <= 0:
            return None
        return self.body[:limit].decode("utf-8", errors="replace")

    def scrubbed(self, secrets: Sequence[str]) -> Response:
        """This response with ``secrets`` masked in its body (see :func:`integrations.redact.scrub`)."""
        if not secrets or not self.body:
            return self
        body = redact.scrub(self.body, secrets)
        return self if body is self.body else replace(self, body=body)


class BlockedAddress(PermanentError):
    """The request's host resolves to an address the service may not reach."""


def check_address(url: str, allowed: Sequence[Network] = ()) -> None:
    """Refuse hosts that resolve to loopback, private, link-local or otherwise non-global
    addresses, except those in the ``allowed`` networks.

    The check resolves the name itself; a DNS answer that changes between this look-up and the
    connection (rebinding) is not caught here.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        infos = socket.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise TransientError(f"cannot resolve {host}") from e
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        inner = _embedded_ipv4(ip)
        public = ip.is_global and (inner is None or inner.is_global)
        if not public and not any(ip in net or (inner is not None and inner in net) for net in allowed):
            raise BlockedAddress(
                f"refused to connect to {host}: it resolves to a non-public address "
                "(a service allows it with allow_private_network or allowed_networks; outgoing webhooks "
                "with WEBHOOK_ALLOWED_NETWORKS)"
            )


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped ::ffff:a.b.c.d, compatible ::a.b.c.d,
    NAT64 64:ff9b::a.b.c.d), which Python may call global whatever the IPv4 address is."""
    if ip.version != 6:
        return None
    assert isinstance(ip, ipaddress.IPv6Address)
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64 or int(ip) >> 32 == 0:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


class GuardedAdapter(HTTPAdapter):
    """An adapter that applies :func:`check_address` to every request it sends."""

    def __init__(self, allowed: Sequence[Network] = ()) -> None:
        super().__init__()
        self.allowed = tuple(allowed)

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        check_address(request.url or "", self.allowed)
        return super().send(request, *args, **kwargs)


_local = threading.local()


def _reset_sessions_in_child() -> None:
    # Pooled sockets must not be shared between a parent and its forked children.
    global _local
    _local = threading.local()


os.register_at_fork(after_in_child=_reset_sessions_in_child)


def session_for(service: Peer) -> requests.Session:
    """The keep-alive session of ``service`` in this thread, made on first use."""
    sessions: dict[str, requests.Session] | None = getattr(_local, "sessions", None)
    if sessions is None:
        sessions = _local.sessions = {}
    session = sessions.get(service.name)
    if session is None:
        session = requests.Session()
        # Proxies and credentials come from the services file, not from ~/.netrc or the environment.
        session.trust_env = False
        adapter = HTTPAdapter() if service.allow_private_network else GuardedAdapter(service.allowed_networks)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.auth = requests_auth(service.auth)
        if service.ca_bundle is not None:
            session.verify = str(service.ca_bundle)
        session.headers.update({"User-Agent": USER_AGENT, **service.headers})
        sessions[service.name] = session
    return session


def send(service: Peer, req: Request, max_bytes: int) -> Response:
    """Send ``req`` with the service's session and timeout; return whatever status came back.

    Raises :class:`TransientError` for connection failures and timeouts, :class:`PermanentError`
    for a refused address or a body over ``max_bytes``. Messages name the host, never the URL,
    which may carry an API key.
    """
    host = urlsplit(req.url).hostname
    t0 = time.perf_counter()
    try:
        with session_for(service).request(
            req.method,
            req.url,
            params=req.params or None,
            json=req.json,
            data=req.content,
            allow_redirects=req.follow_redirects,
            headers=req.headers or None,
            timeout=service.timeout,
            stream=True,
        ) as r:
            length = r.headers.get("content-length", "").strip()
            declared = int(length) if length.isdigit() else 0
            if declared > max_bytes:
                raise PermanentError(f"response from {host} is larger than {max_bytes} bytes")
            body = r.raw.read(max_bytes + 1, decode_content=True)
            if len(body) > max_bytes:
                raise PermanentError(f"response from {host} is larger than {max_bytes} bytes")
    except CallError:
        raise
    except requests.Timeout as e:
        raise TransientError(f"{host} did not answer within {service.timeout}s") from e
    except requests.ConnectionError as e:
        raise TransientError(f"connection to {host} failed ({_cause(e)})") from e
    except requests.RequestException as e:
        raise PermanentError(f"request to {host} failed ({type(e).__name__})") from e
    latency_ms = (time.perf_counter() - t0) * 1000
    return Response(r.status_code, r.reason or "", dict(r.headers.lower_items()), body, latency_ms)


def classify(resp: Response, retry_after_max: float) -> CallError | None:
    """The error an HTTP response stands for, or ``None`` for 2xx.

    408 and 5xx are transient; 429 and 503 are :class:`RateLimited` with the server's
    ``Retry-After`` (capped at ``retry_after_max``); every other status is permanent.
    """
    code = resp.status_code
    if 200 <= code < 300:
        return None
    what = f"HTTP {code} {resp.reason}".strip()
    if code in (429, 503):
        delay = parse_retry_after(resp.headers.get("retry-after"))
        if delay is not None:
            delay = min(delay, retry_after_max)
        return RateLimited(what, status_code=code, retry_after=delay)
    if code == 408 or code >= 500:
        return TransientError(what, status_code=code)
    return PermanentError(what, status_code=code)


def budget_spent_for(resp: Response, now: float | None = None, cap: float | None = None) -> float | None:
    """Seconds until the upstream's rate-limit window resets, when its headers say the budget is
    spent (``x-ratelimit-remaining: 0`` with ``x-ratelimit-reset`` in epoch seconds, as GitHub
    sends: https://docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api)."""
    h = resp.headers
    if h.get("x-ratelimit-remaining", "").strip() != "0":
        return None
    reset = h.get("x-ratelimit-reset", "").strip()
    if not reset.isdigit():
        return None
    wait = max(0.0, int(reset) - (time.time() if now is None else now))
    return wait if cap is None else min(wait, cap)


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - (now or dt.datetime.now(dt.UTC))).total_seconds())


def _cause(e: BaseException) -> str:
    """A short, URL-free reason for a connection failure."""
    text = repr(e)
    for needle, reason in (
        ("Connection refused", "connection refused"),
        ("RemoteDisconnected", "connection dropped"),
        ("Connection aborted", "connection dropped"),
        ("Connection reset", "connection reset"),
        ("Name or service not known", "name not resolved"),
        ("SSL", "TLS error"),
    ):
        if needle in text:
            return reason
    return type(e).__name__
