"""Outgoing webhooks: endpoints subscribe to event types; each event is delivered to each of
them, signed per Standard Webhooks, on a retry schedule kept in the ledger.

One try (:func:`attempt`): POST the delivery's fixed body with ``webhook-id`` (the delivery's
id, the same on every try), ``webhook-timestamp`` and ``webhook-signature``, through the one
HTTP choke point (timeouts, SSRF guard, bounded response). 2xx is success; anything else,
including 3xx and timeouts, is a failure tried again after the next step of
``WEBHOOK_RETRY_SCHEDULE``, or after ``Retry-After`` for 429, 502 and 504. 410 Gone disables
the endpoint; so does failing without a success for ``WEBHOOK_DISABLE_AFTER``.
"""

from __future__ import annotations

import base64
import datetime as dt
import fnmatch
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from integrations import http, redact, ssrf
from integrations.auth import NoAuth
from integrations.config import Settings, get_settings
from integrations.config.schema import check_url
from integrations.errors import CallError, IntegrationError
from integrations.ledger import deliveries as ledger
from integrations.ledger.models import utcnow
from integrations.ssrf import Network
from integrations.webhooks.verify import sign

log = logging.getLogger(__name__)

#: Statuses whose Retry-After is honoured.
RETRY_AFTER_STATUSES = (429, 502, 504)
#: How much of a response body each attempt keeps.
EXCERPT_BYTES = 512


@dataclass(frozen=True)
class _Endpoints:
    """The endpoints as a :class:`integrations.http.Peer`: one pooled session for them all."""

    timeout: float
    allowed_networks: tuple[Network, ...]
    name: str = "outgoing-webhooks"
    allow_private_network: bool = False
    auth: NoAuth = field(default_factory=NoAuth)
    ca_bundle: Path | None = None
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})


def _peer(s: Settings) -> _Endpoints:
    return _Endpoints(timeout=s.webhook_timeout, allowed_networks=s.allowed_networks)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def add_endpoint(
    url: str, event_types: list[str], secret: str | None = None, description: str | None = None
) -> tuple[str, str]:
    """Store an endpoint; return ``(endpoint_id, secret)`` (a new secret unless one is given)."""
    check_endpoint_url(url, get_settings().allowed_networks)
    event_types = [t.strip() for t in event_types if t.strip()]
    if not event_types:
        raise IntegrationError("give at least one event type (or '*' for all)")
    secret = secret or new_secret()
    try:
        if not secret.startswith("whsec_") or not base64.b64decode(secret[6:], validate=True):
            raise ValueError
    except ValueError:
        raise IntegrationError("secret must look like whsec_<base64>") from None
    return ledger.add_endpoint(url, secret, event_types, description), secret


def check_endpoint_url(url: str, networks: tuple[Network, ...]) -> None:
    """Refuse what could never be delivered safely: a malformed URL, credentials in it, a host
    that is (or resolves to) a non-public address outside ``networks``. Raises
    :class:`IntegrationError` naming the problem, never the URL."""
    try:
        check_url(url, what="endpoint URL", query_allowed=True)
    except ValueError as e:
        raise IntegrationError(str(e)) from None
    parts = urlsplit(url)
    try:
        ssrf.resolve(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), networks)
    except ssrf.BlockedAddress:
        raise IntegrationError(
            "endpoint URL: its host is not a public address (WEBHOOK_ALLOWED_NETWORKS allows networks)"
        ) from None
    except (OSError, UnicodeError):
        raise IntegrationError("endpoint URL: its host name does not resolve") from None


def publish(event_type: str, data: Any) -> list[str]:
    """Fan an event out to every enabled endpoint subscribed to ``event_type``; return the
    delivery ids (each due now; :func:`tasks.webhooks.publish_webhook` also queues them)."""
    if not event_type or len(event_type) > 200:
        raise IntegrationError("event type must be 1 to 200 characters")
    try:
        body = json.dumps(
            {"type": event_type, "timestamp": utcnow().isoformat(), "data": data}, separators=(",", ":")
        )
    except (TypeError, ValueError):
        raise IntegrationError("event data must be JSON-serialisable") from None
    targets = [
        endpoint_id
        for endpoint_id, patterns in ledger.subscribed_endpoints()
        if any(fnmatch.fnmatchcase(event_type, p) for p in patterns)
    ]
    return ledger.create_deliveries(event_type, body, targets)


def attempt(delivery_id: str) -> str | None:
    """Make one try of a due delivery and record it; return its new status (``None``: not due,
    taken by another worker, or superseded while it ran)."""
    s = get_settings()
    now = utcnow()
    claim = ledger.claim(delivery_id, now)
    if claim is None:
        return None
    if not claim.enabled:
        return ledger.record(
            claim,
            ok=False,
            status_code=None,
            duration_ms=None,
            error="endpoint is disabled",
            excerpt=None,
            next_attempt_at=None,
        )
    body = claim.body.encode()
    ts = int(time.time())
    headers = {
        "webhook-id": claim.delivery_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(
            base64.b64decode(claim.secret.removeprefix("whsec_")), claim.delivery_id, ts, body
        ),
    }
    # The URL's path and query may be the endpoint's secret: keep them out of every log line.
    parts = urlsplit(claim.url)
    redact.register(parts.path.strip("/") if len(parts.path) > 8 else None, parts.query or None)
    req = http.Request("POST", claim.url, headers=headers, content=body, follow_redirects=False)
    t0 = time.perf_counter()
    code: int | None = None
    excerpt: str | None = None
    retry_after: float | None = None
    try:
        resp = http.send(_peer(s), req, max_bytes=s.response_max_bytes)
        code = resp.status_code
        excerpt = resp.excerpt(EXCERPT_BYTES)
        error = None if 200 <= code < 300 else f"HTTP {code} {resp.reason}".strip()
        if code in RETRY_AFTER_STATUSES:
            retry_after = http.parse_retry_after(resp.headers.get("retry-after"))
    except CallError as e:
        error = str(e)
    except Exception as e:  # a malformed answer, the soft time limit: still one failed try
        error = f"the try failed ({type(e).__name__})"
    duration_ms = (time.perf_counter() - t0) * 1000
    ok = error is None

    next_at: dt.datetime | None = None
    if not ok:
        done = utcnow()  # steps and Retry-After count from the answer, not from the request
        next_at = _next_try(s, claim.attempt, retry_after, done)
        failing_for = done - (claim.failing_since or done)
        if code == 410:
            next_at = None
            ledger.set_enabled(claim.endpoint_id, False, "the endpoint answered 410 Gone")
            log.warning("endpoint %s disabled: it answered 410 Gone", claim.endpoint_id)
        elif failing_for > dt.timedelta(seconds=s.webhook_disable_after):
            next_at = None
            ledger.set_enabled(
                claim.endpoint_id, False, f"no successful delivery for {s.webhook_disable_after:.0f} seconds"
            )
            log.warning("endpoint %s disabled: failing for too long", claim.endpoint_id)
    return ledger.record(
        claim,
        ok=ok,
        status_code=code,
        duration_ms=duration_ms,
        error=error,
        excerpt=excerpt,
        next_attempt_at=next_at,
    )


def _next_try(s: Settings, attempt: int, retry_after: float | None, now: dt.datetime) -> dt.datetime | None:
    """When to try again after failed try number ``attempt`` (1-based); ``None``: give up."""
    schedule = s.retry_schedule
    if attempt >= len(schedule):
        return None
    delay = schedule[attempt]
    if retry_after is not None:
        # The receiver said when; believed up to the schedule's longest step or an hour.
        delay = min(retry_after, max(*schedule, 3600.0))
    return now + dt.timedelta(seconds=delay)


def due_now() -> list[str]:
    """Deliveries due for a try (beat's dispatcher queues them)."""
    s = get_settings()
    now = utcnow()
    return ledger.due(
        now,
        sending_before=now - dt.timedelta(seconds=s.webhook_timeout + s.task_time_limit),
        # A queued try not taken within a minute (lost message, workers far behind) is queued again.
        queued_before=now - dt.timedelta(seconds=60),
        max_attempts=len(s.retry_schedule),
    )
