"""The one place a GraphQL answer is judged: :func:`judge`.

A rate-limit error in the body is :class:`RateLimited` (even in a 200, as GitHub answers it);
errors without data are permanent; data with errors succeeds, the errors kept on the job
(``meta.errors``); other HTTP statuses are classified as every HTTP kind's are.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from integrations import http, redact
from integrations.errors import CallError, PermanentError, RateLimited

#: Error codes that mean "slow down", in an error's ``type`` (GitHub:
#: https://docs.github.com/en/graphql/overview/rate-limits-and-node-limits-for-the-graphql-api),
#: ``code`` or ``extensions.code`` (Shopify's ``THROTTLED``:
#: https://shopify.dev/docs/api/usage/rate-limits), compared upper-cased.
RATE_LIMIT_CODES = frozenset(
    {
        "RATE_LIMITED",
        "RATE_LIMIT_EXCEEDED",
        "RATELIMITED",
        "THROTTLED",
        "TOO_MANY_REQUESTS",
        "GRAPHQL_RATE_LIMIT",
    }
)
#: What a job keeps of an answer's errors: this many, each message cut to MESSAGE_MAX characters.
ERRORS_KEPT = 10
MESSAGE_MAX = 300
#: The cheapest query every GraphQL schema answers (the health check of the kind's own).
TYPENAME_QUERY = "query { __typename }"
#: GraphQL over HTTP: https://graphql.github.io/graphql-over-http/draft/#sec-Accept
ACCEPT = "application/graphql-response+json, application/json;q=0.9"


def judge(
    resp: http.Response, retry_after_max: float, now: float | None = None
) -> tuple[Any, dict[str, Any]]:
    """``(data, meta)`` of a GraphQL answer, or raise the error it stands for (its ``meta``
    set too). ``meta`` holds a bounded summary of the answer's errors, when it has any.

    - an error whose ``type``, ``code`` or ``extensions.code`` says rate-limited, whatever the
      status: :class:`RateLimited`, after ``Retry-After`` or else ``x-ratelimit-reset``;
    - a status other than 2xx: as :func:`integrations.http.classify` says, with the first
      GraphQL error's message when the body has one;
    - a 2xx without data (absent or null): permanent, with the first error's message;
    - data, with or without errors: returned.
    """
    parsed = resp.data()
    body: dict[str, Any] = parsed if isinstance(parsed, dict) else {}
    raw = body.get("errors")
    errors = [e for e in raw if isinstance(e, dict)] if isinstance(raw, list) else []
    summary = [_summary(e) for e in errors[:ERRORS_KEPT]]
    first = _message(errors)
    err: CallError | None = None
    if any(_rate_limited(e) for e in errors):
        delay = _retry_after(resp, retry_after_max, now)
        err = RateLimited(f"rate limited: {first}", status_code=resp.status_code, retry_after=delay)
    elif (err := http.classify(resp, retry_after_max)) is not None:
        if first and not isinstance(err, RateLimited):
            err = type(err)(f"{err}: {first}", status_code=err.status_code)
    elif not isinstance(parsed, dict):
        kind = resp.headers.get("content-type", "").split(";")[0].strip() or "no content type"
        err = PermanentError(
            f"the answer is not a GraphQL response ({_text(kind)[:64]})", status_code=resp.status_code
        )
    elif body.get("data") is None:
        err = PermanentError(
            f"GraphQL error: {first}" if first else "the answer holds neither data nor errors",
            status_code=resp.status_code,
        )
    meta = _meta(summary, len(errors))
    if err is not None:
        err.meta = meta
        raise err
    return body["data"], meta


def _meta(summary: list[dict[str, Any]], total: int) -> dict[str, Any]:
    if not summary:
        return {}
    return {"errors": summary, **({"errors_omitted": total - len(summary)} if total > len(summary) else {})}


def _codes(error: Mapping[str, Any]) -> list[str]:
    ext = error.get("extensions")
    found = [error.get("type"), error.get("code"), ext.get("code") if isinstance(ext, dict) else None]
    return [c for c in found if isinstance(c, str) and c]


def _rate_limited(error: Mapping[str, Any]) -> bool:
    return any(c.upper().replace("-", "_") in RATE_LIMIT_CODES for c in _codes(error))


def _text(value: Any) -> str:
    """One line of at most MESSAGE_MAX characters, without this process's credentials."""
    line = " ".join(str(value).split())
    line = redact.redact(line)
    return line if len(line) <= MESSAGE_MAX else line[: MESSAGE_MAX - 1] + "…"


def _message(errors: list[dict[str, Any]]) -> str:
    """The first error's message, and how many more there are."""
    if not errors:
        return ""
    text = _text(errors[0].get("message") or "no message")
    return text + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")


def _summary(error: Mapping[str, Any]) -> dict[str, Any]:
    """What the job keeps of one error: its message, where (``path``) and its code."""
    out: dict[str, Any] = {"message": _text(error.get("message") or "")}
    path = error.get("path")
    if isinstance(path, list):
        out["path"] = [p if isinstance(p, int) else _text(p)[:64] for p in path[:20]]
    codes = _codes(error)
    if codes:
        out["code"] = _text(codes[0])[:64]
    return out


def _retry_after(resp: http.Response, cap: float, now: float | None) -> float | None:
    """``Retry-After`` (seconds or a date), else the seconds until ``x-ratelimit-reset`` (epoch
    seconds, GitHub's), capped at ``cap``; ``None`` when neither says."""
    delay = http.parse_retry_after(resp.headers.get("retry-after"))
    reset = resp.headers.get("x-ratelimit-reset", "").strip()
    if delay is None and reset.isdigit():
        delay = max(0.0, int(reset) - (time.time() if now is None else now))
    return None if delay is None else min(delay, cap)


# ---- the kind --------------------------------------------------------------------------------
