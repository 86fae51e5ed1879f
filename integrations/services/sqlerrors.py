"""How the ``sql`` kind's driver errors become ours, in one place: which are worth another try
(the connection, a deadlock, a serialization failure, a timeout) and which are not (syntax,
permission, integrity, data). Messages carry the driver's first line, bounded, with the
service's credentials and the call's values masked.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from integrations import redact
from integrations.errors import CallError, ConfigError, PermanentError, TransientError

#: The driver's text kept in an error message (its first line).
MESSAGE_MAX = 300

#: PostgreSQL SQLSTATEs (https://www.postgresql.org/docs/current/errcodes-appendix.html).
_PG_TRANSIENT = {"40001": "serialization failure", "40P01": "deadlock", "55P03": "lock not available"}
_PG_CLASSES = {"08": "connection failed", "53": "server out of resources", "57": "server shutting down"}
_PG_PERMANENT = {
    "22": "data error",
    "23": "integrity error",
    "28": "authentication failed",
    "42": "syntax or permission error",
}
#: MariaDB error numbers (https://mariadb.com/kb/en/mariadb-error-code-reference/); 2000 and up
#: are the client's own (connection lost, server gone).
_MY_TRANSIENT = {
    1205: "lock wait timeout",
    1213: "deadlock",
    1040: "too many connections",
    1053: "server shutting down",
}
_MY_PERMANENT = {
    1044: "permission error",
    1045: "authentication failed",
    1049: "unknown database",
    1142: "permission error",
}
_READ_ONLY = "a read statement tried to write"


def classify(
    e: BaseException, timeout: float, secrets: Iterable[str], values: Iterable[Any]
) -> CallError | None:
    """The error ``e`` stands for, or ``None`` when it is not the database's (a bug: re-raise).

    Transient: connection refused or dropped, serialization failure, deadlock, a statement
    timeout, no free connection. Permanent: syntax, permission, integrity and data errors, a
    read statement that writes, a refused address. The message is the driver's first line,
    bounded, with the service's credentials and the call's values masked.
    """
    if isinstance(e, CallError):
        return e
    if isinstance(e, ConfigError):  # a secret this process does not have
        return PermanentError(str(e))
    if isinstance(e, PoolTimeout):
        return TransientError("no free database connection in the pool")
    if isinstance(e, OSError):  # our own connect, under the SSRF guard
        return TransientError(f"connection failed ({type(e).__name__})")
    if not isinstance(e, DBAPIError) or e.orig is None:
        return None
    orig = e.orig
    # PyMySQL's str() is the repr of (errno, message).
    pymysql = type(orig).__module__.startswith("pymysql") and len(orig.args) > 1
    text = _clean(str(orig.args[1] if pymysql else orig), secrets, values)
    first = (text.strip().splitlines() or [""])[0][:MESSAGE_MAX]
    err = _by_driver(orig, first, timeout)
    if err is None:
        err = (
            TransientError(f"connection dropped: {first}")
            if e.connection_invalidated
            else PermanentError(f"database error: {first}")
        )
    err.excerpt = text
    return err


def _by_driver(orig: BaseException, first: str, timeout: float) -> CallError | None:
    timed_out = f"statement timed out after {timeout:g}s"
    sqlstate = getattr(orig, "sqlstate", None)
    if type(orig).__module__.startswith("psycopg"):
        if sqlstate is None:  # no answer from a server: connecting failed
            permanent = "authentication failed" in first or "does not exist" in first
            return (PermanentError if permanent else TransientError)(f"connection failed: {first}")
        return _tagged(_pg(sqlstate, first, timed_out), "sqlstate", sqlstate)
    if type(orig).__module__.startswith("pymysql"):
        code = orig.args[0] if orig.args and isinstance(orig.args[0], int) else 0
        return _tagged(_my(code, first, timed_out), "errno", code)
    if isinstance(orig, sqlite3.Error):
        name = getattr(orig, "sqlite_errorname", "")
        if name == "SQLITE_INTERRUPT":
            return TransientError(timed_out)
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return TransientError(f"database is locked: {first}")
        if name.startswith("SQLITE_READONLY"):
            return PermanentError(f"{_READ_ONLY}: {first}")
    return None


def _pg(sqlstate: str, first: str, timed_out: str) -> CallError:
    if sqlstate == "57014":
        return TransientError(timed_out)
    if sqlstate == "25006":
        return PermanentError(f"{_READ_ONLY}: {first}")
    if sqlstate in _PG_TRANSIENT:
        return TransientError(f"{_PG_TRANSIENT[sqlstate]} ({sqlstate}): {first}")
    if sqlstate[:2] in _PG_CLASSES:
        return TransientError(f"{_PG_CLASSES[sqlstate[:2]]} ({sqlstate}): {first}")
    what = _PG_PERMANENT.get(sqlstate[:2], "database error")
    return PermanentError(f"{what} ({sqlstate}): {first}")


def _my(code: int, first: str, timed_out: str) -> CallError:
    if code == 1969:
        return TransientError(timed_out)
    if code == 1792:
        return PermanentError(f"{_READ_ONLY}: {first}")
    if code in _MY_TRANSIENT:
        return TransientError(f"{_MY_TRANSIENT[code]} ({code}): {first}")
    if code >= 2000:
        return TransientError(f"connection failed ({code}): {first}")
    what = _MY_PERMANENT.get(code, "database error")
    return PermanentError(f"{what} ({code}): {first}")


def _tagged(err: CallError, key: str, code: object) -> CallError:
    err.meta[key] = code
    return err


def _clean(text: str, secrets: Iterable[str], values: Iterable[Any]) -> str:
    """The driver's text without credentials, nor the values the call bound (a duplicate key's
    message quotes the value)."""
    text = redact.scrub(text.encode(), list(secrets)).decode(errors="replace")
    for v in values:
        if isinstance(v, str) and len(v) >= 3 and v in text:
            text = text.replace(v, "…")
    return redact.redact(text)
