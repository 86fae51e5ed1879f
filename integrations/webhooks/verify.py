"""Verify an incoming webhook from its raw body and headers, and say what it is.

One function per kind of sender, each returning a :class:`Delivery` or raising
:class:`~integrations.errors.BadSignature` / :class:`~integrations.errors.MalformedBody`.
Signatures are checked on the raw bytes, before anything is parsed, with a constant-time
comparison; timestamps against an injected clock (``now``, epoch seconds).

- GitHub: https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries
- Slack: https://api.slack.com/authentication/verifying-requests-from-slack
- Standard Webhooks: https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from integrations.config import WebhookSource
from integrations.errors import BadSignature, MalformedBody
from integrations.jsonlimits import too_deep

#: How far a signed timestamp may be from our clock, either way (seconds).
TOLERANCE = 300
#: The longest delivery id kept whole (the ledger's column); a longer one is refused, since cut
#: it would make two deliveries one.
DELIVERY_ID_MAX = 255
#: JSON nested deeper than this is refused: no sender nests so deep, and Python's parser and
#: the ledger's serialiser would fail on it with a RecursionError.
JSON_DEPTH_MAX = 64


@dataclass(frozen=True)
class Delivery:
    """A verified webhook: the sender's id for it (redeliveries repeat it), its type, its body.

    ``reply`` is set when the request is a handshake to answer rather than an event to store
    (Slack's ``url_verification``).
    """

    delivery_id: str
    event_type: str
    payload: Any
    reply: dict[str, Any] | None = None


def verify(source: WebhookSource, headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
    """Check a delivery for ``source``; ``headers`` with lower-case names."""
    delivery = _VERIFIERS[source.type](source.secrets, headers, body, now)
    if len(delivery.delivery_id) > DELIVERY_ID_MAX:
        raise MalformedBody(f"delivery id is longer than {DELIVERY_ID_MAX} characters")
    if not (delivery.delivery_id.isprintable() and delivery.event_type.isprintable()):
        raise MalformedBody("delivery id or event type holds a control character")
    return delivery


def _hmac_sha256(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _any_equal(candidates: list[bytes], given: list[bytes]) -> bool:
    """Whether any given signature matches any expected one; each comparison in constant time."""
    found = False
    for expected in candidates:
        for sig in given:
            found |= hmac.compare_digest(expected, sig)
    return found


def _timestamp(raw: str | None, now: float, header: str) -> int:
    if not raw:
        raise BadSignature(f"missing {header} header")
    try:
        ts = int(raw)
    except ValueError:
        raise BadSignature(f"{header} is not a Unix timestamp") from None
    if abs(now - ts) > TOLERANCE:
        raise BadSignature(f"{header} is more than {TOLERANCE} seconds from now")
    return ts


def _json(body: bytes) -> Any:
    try:
        value = json.loads(body, parse_constant=_not_a_number, parse_float=_finite)
    except RecursionError:
        raise MalformedBody(f"body is nested deeper than {JSON_DEPTH_MAX} levels") from None
    except ValueError:
        raise MalformedBody("body is not valid JSON") from None
    if too_deep(value, JSON_DEPTH_MAX):
        raise MalformedBody(f"body is nested deeper than {JSON_DEPTH_MAX} levels")
    return value


def _not_a_number(name: str) -> float:
    raise MalformedBody("body holds NaN or Infinity, which JSON does not allow")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise MalformedBody("body holds a number too large for JSON")
    return value


def _content_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


def _form(body: bytes) -> dict[str, str]:
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body)))
    except (UnicodeDecodeError, ValueError):
        raise MalformedBody("body is not a valid form") from None


def github(secrets: list[bytes], headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
    sig = headers.get("x-hub-signature-256")
    if not sig:
        raise BadSignature("missing X-Hub-Signature-256 header")
    expected = [b"sha256=" + _hmac_sha256(key, body).hex().encode() for key in secrets]
    if not _any_equal(expected, [sig.strip().encode()]):
        raise BadSignature("signature does not match")
    event, delivery = headers.get("x-github-event"), headers.get("x-github-delivery")
    if not event or not delivery:
        raise MalformedBody("missing X-GitHub-Event or X-GitHub-Delivery header")
    kind = _content_type(headers)
    if kind == "application/x-www-form-urlencoded":  # a hook set to send form data
        payload = _json(_form(body).get("payload", "").encode())
    elif kind.startswith("text/"):
        try:
            payload = body.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedBody("body is not UTF-8 text") from None
    else:
        payload = _json(body)
    return Delivery(delivery, event, payload)


def slack(secrets: list[bytes], headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
    raw_ts = headers.get("x-slack-request-timestamp")
    sig = headers.get("x-slack-signature")
    if not sig:
        raise BadSignature("missing X-Slack-Signature header")
    ts = _timestamp(raw_ts, now, "X-Slack-Request-Timestamp")
    base = f"v0:{ts}:".encode() + body
    expected = [b"v0=" + _hmac_sha256(key, base).hex().encode() for key in secrets]
    if not _any_equal(expected, [sig.strip().encode()]):
        raise BadSignature("signature does not match")

    if _content_type(headers) == "application/x-www-form-urlencoded":
        form = _form(body)
        if "payload" in form:  # interactivity: buttons, menus, modals
            payload = _json(form["payload"].encode())
            if not isinstance(payload, dict):
                raise MalformedBody("interaction payload is not an object")
            kind = str(payload.get("type") or "interaction")
        elif "command" in form:  # slash commands
            payload, kind = form, "slash_command"
        else:
            raise MalformedBody("form body is neither a slash command nor an interaction")
        delivery = str(payload.get("trigger_id") or "")
    else:
        payload = _json(body)
        if not isinstance(payload, dict):
            raise MalformedBody("body is not a JSON object")
        if payload.get("type") == "url_verification":
            challenge = payload.get("challenge")
            if not isinstance(challenge, str):
                raise MalformedBody("url_verification without a challenge")
            return Delivery("", "url_verification", payload, reply={"challenge": challenge})
        event = payload.get("event")
        kind = str(event.get("type")) if isinstance(event, dict) and event.get("type") else "event"
        delivery = str(payload.get("event_id") or "")
    # Slack retries an event with the same event_id; other requests carry a trigger_id. The
    # rare request with neither is known by its signature, which is unique per timestamp+body.
    return Delivery(delivery or sig.strip(), kind, payload)


def standard(secrets: list[bytes], headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
    msg_id = headers.get("webhook-id")
    raw_ts = headers.get("webhook-timestamp")
    sig_header = headers.get("webhook-signature")
    if not msg_id or not sig_header:
        raise BadSignature("missing webhook-id or webhook-signature header")
    ts = _timestamp(raw_ts, now, "webhook-timestamp")
    content = f"{msg_id}.{ts}.".encode() + body
    expected = [base64.b64encode(_hmac_sha256(key, content)) for key in secrets]
    given = []
    for part in sig_header.split():
        version, _, value = part.partition(",")
        if version == "v1" and value:  # other versions (v1a: asymmetric, ...) are ignored
            given.append(value.encode())
    if not given or not _any_equal(expected, given):
        raise BadSignature("no v1 signature matches")
    payload = _json(body)
    kind = payload.get("type") if isinstance(payload, dict) else None
    return Delivery(msg_id, str(kind) if kind else "event", payload)


def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks ``webhook-signature`` value for an outgoing delivery."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(_hmac_sha256(secret, content)).decode()


_VERIFIERS: dict[str, Callable[[list[bytes], Mapping[str, str], bytes, float], Delivery]] = {
    "github": github,
    "slack": slack,
    "standard": standard,
}
