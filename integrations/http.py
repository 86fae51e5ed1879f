"""The one place where HTTP requests are made.

Every outgoing request goes through :func:`send`: a pooled session per service and thread, a
timeout, the SSRF guard on every connection (:mod:`integrations.ssrf`, redirects included),
redirects followed within the service's origin only, a bounded body, and one classification
of the outcome into :mod:`integrations.errors`.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from integrations import jsonlimits, redact, ssrf
from integrations.auth import Auth, QueryAuth, requests_auth
from integrations.errors import CallError, PermanentError, RateLimited, TransientError
from integrations.ssrf import Network

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
                return jsonlimits.loads(text)
            except jsonlimits.TooDeep as e:
                raise PermanentError(f"the answer's JSON is {e}", status_code=self.status_code) from None
            except ValueError:
                return text
        return text

    def excerpt(self, limit: int) -> str | None:
        """At most ``limit`` bytes of the body, for the ledger."""
        if not self.body or limit <= 0:
            return None
        return self.body[:limit].decode("utf-8", errors="replace")

    def scrubbed(self, secrets: Sequence[str]) -> Response:
        """This response with ``secrets`` masked in its body and its reason phrase (see
        :func:`integrations.redact.scrub`): what an upstream echoes must not be stored."""
        if not secrets:
            return self
        body = redact.scrub(self.body, secrets) if self.body else self.body
        reason = redact.scrub(self.reason.encode(), secrets).decode() if self.reason else self.reason
        if body is self.body and reason == self.reason:
            return self
        return replace(self, body=body, reason=reason)

    def data_scrubbed(self, secrets: Sequence[str]) -> Any:
        """:meth:`data`, with ``secrets`` also masked in the parsed strings: JSON may write a
        secret escaped (``\\/``, ``\\u003d``), which the raw body does not show."""
        data = self.data()
        if secrets and b"\\" in self.body:
            return redact.scrub_data(data, secrets)
        return data


class CrossOriginRedirect(PermanentError):
    """A service's upstream redirected to another origin: not followed, since the request
    carries the service's credentials and they never go anywhere but the service's origin."""


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


class GuardedAdapter(HTTPAdapter):
    """An adapter whose connections go only where the SSRF guard allows (:mod:`integrations.ssrf`),
    to exactly the address it judged."""

    def __init__(self, allowed: Sequence[Network] = ()) -> None:
        self.allowed = tuple(allowed)
        super().__init__()

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = ssrf.pool_classes(self.allowed)


class ServiceSession(requests.Session):
    """A keep-alive session that follows redirects within the first request's origin only."""

    def rebuild_auth(self, prepared_request: requests.PreparedRequest, response: requests.Response) -> None:
        before, after = origin(response.request.url or ""), origin(prepared_request.url or "")
        if before != after:
            raise CrossOriginRedirect(
                f"{before[1]} redirected to another origin ({after[1]}); not followed, so the "
                "service's credentials stay with its origin"
            )
        super().rebuild_auth(prepared_request, response)  # type: ignore[no-untyped-call]
        # requests re-applies no session auth on a redirect; an API key in the query would be lost.
        if isinstance(self.auth, QueryAuth) and self.auth.name + "=" not in (prepared_request.url or ""):
            prepared_request.prepare_auth(self.auth)


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
        session = ServiceSession()
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
    # Not chained (``from None``): the library's exception names the URL, and a traceback of
    # ours would carry it into logs, the result backend and task events.
    except requests.Timeout:
        raise TransientError(f"{host} did not answer within {service.timeout}s") from None
    except requests.ConnectionError as e:
        raise TransientError(f"connection to {host} failed ({_cause(e)})") from None
    except requests.RequestException as e:
        raise PermanentError(f"request to {host} failed ({type(e).__name__})") from None
    except ValueError:  # a malformed Location or URL from the upstream (urllib3's LocationParseError)
        raise PermanentError(f"{host} answered with a malformed redirect") from None
    latency_ms = (time.perf_counter() - t0) * 1000
    return Response(r.status_code, r.reason or "", dict(r.headers.lower_items()), body, latency_ms)


def classify(resp: Response, retry_after_max: float) -> CallError | None:
    """The error an HTTP response stands for, or ``None`` for 2xx.

    408 and 5xx are transient; 429 and 503, and a 403 whose headers say a rate limit was hit,
    are :class:`RateLimited` with the server's ``Retry-After`` (capped at ``retry_after_max``);
    every other status is permanent.
    """
    code = resp.status_code
    if 200 <= code < 300:
        return None
    what = f"HTTP {code} {resp.reason}".strip()
    # GitHub answers its primary and secondary rate limits with 403 too, saying so in its
    # headers: https://docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api
    spent = code == 403 and (
        "retry-after" in resp.headers or resp.headers.get("x-ratelimit-remaining", "").strip() == "0"
    )
    if code in (429, 503) or spent:
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
