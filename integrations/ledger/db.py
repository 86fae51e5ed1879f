"""One engine per process, made on first use and dropped in a forked child."""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

from integrations.config import get_settings
from integrations.config.settings import private_file

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

_lock = threading.Lock()
_engine: Engine | None = None


def make_engine(url: str, autocommit: bool = False) -> Engine:
    """An engine tuned for the ledger: WAL and a busy timeout on SQLite, a pool on Postgres.

    ``autocommit`` (Postgres only) commits each statement by itself: one round trip instead of
    BEGIN, statement, COMMIT. The ledger's hot-path writes are single statements, so they keep
    their atomicity; migrations use transactions.
    """
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            private_file(Path(u.database))
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # No pre-ping: it doubles the round trips; a dropped connection is detected on use, thrown
    # out of the pool, and the write is retried by the caller.
    return create_engine(
        url,
        # An unreachable server fails fast instead of hanging the caller.
        connect_args={"connect_timeout": 5},
        pool_size=5,
        max_overflow=10,
        pool_recycle=1800,
        isolation_level="AUTOCOMMIT" if autocommit else None,
    )


def get_engine() -> Engine:
    global _engine
    if _engine is None:
        with _lock:
            if _engine is None:
                _engine = make_engine(get_settings().database_url, autocommit=True)
    return _engine


def unreachable(e: BaseException) -> bool:
    """The database could not be reached (down, restarting, network cut), as opposed to a
    statement it refused."""
    if isinstance(e, DBAPIError) and e.connection_invalidated:
        return True
    return isinstance(e, (OperationalError, InterfaceError))


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    name = getattr(state.fn, "__name__", "a write")
    # The exception's type only: its text may name the server.
    log.warning("ledger unreachable (%s); retrying %s in %.1fs", type(exc).__name__, name, wait)


def retried(fn: Callable[P, T]) -> Callable[P, T]:
    """Retry ``fn`` with jittered exponential backoff while the database is unreachable, for up
    to ``LEDGER_RETRY_FOR`` seconds. For the worker's writes: an outcome is never dropped
    because Postgres restarted. Each wrapped write is idempotent or guarded by a constraint."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        retrying = Retrying(
            retry=retry_if_exception(unreachable),
            wait=wait_random_exponential(multiplier=0.2, max=5),
            stop=stop_after_delay(get_settings().ledger_retry_for),
            before_sleep=_log_retry,
            reraise=True,
        )
        return retrying(fn, *args, **kwargs)

    return wrapper


def _forget_engine_in_child() -> None:
    # A forked worker child must not share the parent's open connections.
    global _engine
    if _engine is not None:
        _engine.dispose(close=False)
    _engine = None


os.register_at_fork(after_in_child=_forget_engine_in_child)
