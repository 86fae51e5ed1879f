"""Keep credentials out of everything we store, log or show.

Two tools:

- :func:`redact` for text that may end up in a log, an error or the ledger: every credential
  this process has loaded (registered with :func:`register` by :class:`~integrations.config.
  secrets.Secret` and the settings) is replaced, in the forms it travels in (as is, URL-encoded,
  JSON-escaped), and so are the shapes credentials have in URLs and headers whatever their
  value (``user:pass@``, ``?api_key=``, ``Authorization: Bearer``).
- :func:`scrub` for an upstream's answer: the calling service's own secret values, replaced in
  the raw bytes before they are parsed, excerpted or returned (an upstream that echoes the
  request must not put our token in the ledger).

:func:`install` makes every log record of the process go through :func:`redact`, at every
level and from every library (urllib3's DEBUG lines print URLs with their query string).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

MASK = "[REDACTED]"
#: Shorter values are not registered: masking every "test" or "5432" in a log would say
#: nothing, and scrub answers of what is not a secret.
MIN_LENGTH = 6

#: Query parameters and fields that carry a credential whatever their value.
_CREDENTIAL_NAMES = (
    r"api[_-]?key|apikey|key|token|access[_-]?token|refresh[_-]?token|id[_-]?token|client[_-]?secret"
    r"|secret|password|passwd|pwd|signature|sig|auth|authorization|code|access[_-]?key|x-amz-signature"
    r"|x-amz-credential"
    r"|x-amz-security-token"
)
_PATTERNS = [
    # user:password@ in any URL
    (re.compile(r"(?P<keep>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@]*:[^/\s@]*@"), r"\g<keep>" + MASK + "@"),
    # ?api_key=... / &token=... in a URL or a form body
    (re.compile(rf"(?P<keep>[?&;](?:{_CREDENTIAL_NAMES})=)[^&\s;'\"]+", re.IGNORECASE), r"\g<keep>" + MASK),
    # Authorization: Bearer ... / Basic ... (a header, or a repr of one)
    (
        # ...a value that looks like a credential (long, with a digit), not "token endpoint".
        re.compile(
            r"(?P<keep>\b(?:Bearer|Basic|Token|Bot)\s+)(?=[A-Za-z0-9._~+/=-]*\d)[A-Za-z0-9._~+/=-]{12,}",
            re.IGNORECASE,
        ),
        r"\g<keep>" + MASK,
    ),
]

_lock = threading.Lock()
_values: set[str] = set()
_compiled: re.Pattern[str] | None = None


def variants(value: str) -> set[str]:
    """The forms a secret takes on the way out: as is, URL-encoded, JSON-escaped, and as the
    base64 of ``user:password`` when it is one (Basic auth)."""
    forms = {value, quote(value, safe=""), quote_plus(value), json.dumps(value)[1:-1]}
    if ":" in value:
        forms.add(base64.b64encode(value.encode()).decode())
    return {f for f in forms if len(f) >= MIN_LENGTH}


def register(*values: str | None) -> None:
    """Mask ``values`` in everything :func:`redact` sees from now on."""
    global _compiled
    new = set()
    for value in values:
        if value and len(value) >= MIN_LENGTH:
            new |= variants(value)
    with _lock:
        if new - _values:
            _values.update(new)
            _compiled = None


def _pattern() -> re.Pattern[str] | None:
    global _compiled
    with _lock:
        if _compiled is None and _values:
            # Longest first: a value that contains another is masked whole.
            alternatives = sorted(_values, key=len, reverse=True)
            _compiled = re.compile("|".join(re.escape(v) for v in alternatives))
        return _compiled


def redact(text: str) -> str:
    """``text`` with every registered credential and every credential-shaped part masked."""
    if not text:
        return text
    pattern = _pattern()
    if pattern is not None:
        text = pattern.sub(MASK, text)
    for regex, repl in _PATTERNS:
        text = regex.sub(repl, text)
    return text


def scrub(body: bytes, secrets: Iterable[str]) -> bytes:
    """``body`` with each of ``secrets`` (in every form of :func:`variants`) masked."""
    for secret in secrets:
        for form in sorted(variants(secret), key=len, reverse=True):
            raw = form.encode()
            if raw in body:
                body = body.replace(raw, MASK.encode())
    return body


def scrub_data(data: Any, secrets: Iterable[str]) -> Any:
    """``data`` (parsed JSON) with ``secrets`` masked inside every string, key or value."""
    values = sorted({v for s in secrets for v in variants(s)}, key=len, reverse=True)
    if not values:
        return data

    def clean(node: Any) -> Any:
        if isinstance(node, str):
            for value in values:
                if value in node:
                    node = node.replace(value, MASK)
            return node
        if isinstance(node, dict):
            return {clean(k): clean(v) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node

    return clean(data)


class RedactingFilter(logging.Filter):
    """Rewrites a record's message and traceback through :func:`redact`; drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    if getattr(record, "_redacted", False):
        return record
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: keep what can be kept
        message = str(record.msg)
    record.msg, record.args = redact(message), None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record._redacted = True
    return record


_installed = False


def install() -> None:
    """Redact every log record this process creates, whatever its logger, level or handler.

    Done in the record factory rather than in a handler's filter: Celery, uvicorn and the
    libraries add handlers of their own at start-up, and a record is created once."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        return redact_record(previous(*args, **kwargs))

    logging.setLogRecordFactory(factory)
