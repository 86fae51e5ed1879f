"""Slack's answers mapped onto the project's errors, in one place: :func:`api_error` for the
Web API, :func:`upload_error` for the upload host (plain HTTP statuses).

Slack answers most errors with HTTP 200 and ``{"ok": false, "error": "<code>"}``
(https://docs.slack.dev/apis/web-api/), and rate limits with HTTP 429
and a ``Retry-After`` header (https://docs.slack.dev/apis/web-api/rate-limits).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from integrations import http
from integrations.errors import CallError, PermanentError, RateLimited, TransientError

#: Answers that say the token cannot be used (the errors every method's page lists):
#: permanent, however often it is tried again.
AUTH_ERRORS = {
    "not_authed": "no token was sent",
    "invalid_auth": "the token is not valid, or may not be used from this address",
    "account_inactive": "the token's user or workspace was deleted",
    "token_revoked": "the token was revoked or the app removed",
    "token_expired": "the token has expired",
}
#: Slack's own trouble: the next try may succeed.
TRANSIENT_ERRORS = frozenset({"internal_error", "fatal_error", "service_unavailable", "request_timeout"})
#: How much of one of Slack's strings (a scope list, a message) an error or the ledger keeps.
TEXT_MAX = 200


def api_error(
    method: str, resp: http.Response, body: dict[str, Any] | None, retry_after_max: float
) -> CallError | None:
    """The error a Web API answer stands for, or ``None`` when it is ``ok``.

    ``ratelimited``, or HTTP 429, is :class:`RateLimited` for the Retry-After Slack gives
    (at most ``retry_after_max``), pausing this method's scope (``method:<method>``) only. The
    codes that say the token cannot be used, and ``missing_scope`` (naming the scope Slack
    says is ``needed``), are permanent; Slack's own trouble (``internal_error``,
    ``fatal_error``, ``service_unavailable``, ``request_timeout``) is transient; any other
    code is permanent, named in the message. An answer that is not a Web API body is judged
    by its HTTP status. ``err.meta`` keeps Slack's code, the scopes and the warnings.
    """
    failed = body is not None and body.get("ok") is False
    code = (short(body.get("error")) or "unknown_error") if body is not None and failed else None
    what = f"slack {method}"
    err: CallError
    if resp.status_code == 429 or code == "ratelimited":
        err = RateLimited(
            f"{what}: ratelimited", retry_after=_retry_after(resp, retry_after_max), scope=f"method:{method}"
        )
    elif code is None:
        if body is not None and 200 <= resp.status_code < 300:
            return None
        err = http.classify(resp, retry_after_max) or PermanentError("the answer is not a Web API response")
        err.args = (f"{what}: {err}",)
    elif code in AUTH_ERRORS:
        err = PermanentError(f"{what}: {code} ({AUTH_ERRORS[code]})")
    elif code == "missing_scope":
        assert body is not None
        needed, provided = short(body.get("needed")), short(body.get("provided"))
        has = f"; it has {provided}" if provided else ""
        err = PermanentError(f"{what}: missing_scope (the token needs scope {needed or '(not named)'}{has})")
    elif code in TRANSIENT_ERRORS:
        err = TransientError(f"{what}: {code}")
    else:
        err = PermanentError(f"{what}: {code}")
    err.status_code, err.latency_ms = resp.status_code, resp.latency_ms
    meta: dict[str, Any] = {"method": method, "error": code}
    if body is not None:
        meta |= {k: short(body.get(k)) for k in ("needed", "provided")}
        meta |= {"warnings": warnings(body), "messages": messages(body)}
    err.meta = {k: v for k, v in meta.items() if v}
    return err


def upload_error(host: str, resp: http.Response, retry_after_max: float, scope: str) -> CallError | None:
    """The error of the upload host's answer. It answers 200 to a good upload (Slack's
    files.getUploadURLExternal page); 429 pauses ``scope`` (uploads) only; 408 and 5xx are
    transient; anything else permanent."""
    code = resp.status_code
    if code == 200:
        return None
    what = f"slack file upload to {host}: HTTP {code}"
    err: CallError
    if code == 429:
        err = RateLimited(what, retry_after=_retry_after(resp, retry_after_max), scope=scope)
    elif code == 408 or code >= 500:
        err = TransientError(what)
    else:
        err = PermanentError(what)
    err.status_code, err.latency_ms = code, resp.latency_ms
    return err


def body_of(resp: http.Response) -> dict[str, Any] | None:
    """The answer as a Web API body (a JSON object with a boolean ``ok``), or ``None``."""
    try:
        data = json.loads(resp.body)
    except ValueError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("ok"), bool) else None


def warnings(body: Mapping[str, Any]) -> list[str]:
    """``response_metadata.warnings``, or the older top-level ``warning`` (comma-separated):
    https://api.slack.com/changelog/2016-09-28-response-metadata-is-on-the-way"""
    meta = body.get("response_metadata")
    found = meta.get("warnings") if isinstance(meta, dict) else None
    if not isinstance(found, list):
        top = body.get("warning")
        found = top.split(",") if isinstance(top, str) else []
    return [w for w in (short(x) for x in found[:10]) if w]


def messages(body: Mapping[str, Any]) -> list[str]:
    """``response_metadata.messages``: Slack's details of an error (what is wrong in blocks)."""
    meta = body.get("response_metadata")
    found = meta.get("messages") if isinstance(meta, dict) else None
    return [m for m in (short(x) for x in found[:5]) if m] if isinstance(found, list) else []


def short(value: Any) -> str | None:
    """One of Slack's strings as one bounded line (``None`` for anything else)."""
    if not isinstance(value, str) or not value.strip():
        return None
    return " ".join(value.split())[:TEXT_MAX]


def _retry_after(resp: http.Response, cap: float) -> float | None:
    delay = http.parse_retry_after(resp.headers.get("retry-after"))
    return min(delay, cap) if delay is not None else None
