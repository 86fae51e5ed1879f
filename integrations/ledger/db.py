"""One engine per process, made on first use and dropped in a forked child."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from integrations.config import get_settings

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
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
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


def _forget_engine_in_child() -> None:
    # A forked worker child must not share the parent's open connections.
    global _engine
    if _engine is not None:
        _engine.dispose(close=False)
    _engine = None


os.register_at_fork(after_in_child=_forget_engine_in_child)
