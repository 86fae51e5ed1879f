"""The database side of the ``sql`` kind: one pooled engine per service and process, the
read-only transaction and statement timeout of each backend, the SSRF guard on every new
connection, and rows as JSON values. Errors are classified in :mod:`~integrations.services.sqlerrors`.

Backends: PostgreSQL (psycopg 3), MariaDB/MySQL (PyMySQL) and SQLite.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from typing import Any, Protocol
from uuid import UUID

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from integrations import ssrf
from integrations.ssrf import BlockedAddress, Network

#: The driver each backend is spoken with (``postgresql://`` means ``postgresql+psycopg://``).
DRIVERS = {"postgresql": "psycopg", "mysql": "pymysql", "mariadb": "pymysql", "sqlite": "pysqlite"}


class Target(Protocol):
    """What an engine is made from: the parts of a ``sql`` service's config."""

    @property
    def name(self) -> str: ...
    @property
    def timeout(self) -> float: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def pool_size(self) -> int: ...
    @property
    def allow_private_network(self) -> bool: ...
    @property
    def allowed_networks(self) -> Sequence[Network]: ...
    def database_url(self) -> URL: ...


def parse_url(raw: str) -> URL:
    """The URL with its driver made explicit; ``ValueError`` naming the problem, never the URL."""
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):
        raise ValueError("not a database URL (postgresql://, mysql://, mariadb:// or sqlite:///)") from None
    backend = url.get_backend_name()
    if backend not in DRIVERS:
        raise ValueError("unsupported database; use postgresql, mysql, mariadb or sqlite")
    driver = url.get_driver_name() if "+" in url.drivername else DRIVERS[backend]
    if driver != DRIVERS[backend]:
        raise ValueError(
            f"{backend} is spoken with {DRIVERS[backend]} here ({backend}+{DRIVERS[backend]}://)"
        )
    return url.set(drivername=f"{backend}+{driver}")


# ---- engines ---------------------------------------------------------------------------------

_lock = threading.Lock()
_engines: dict[str, Engine] = {}


def engine_for(target: Target) -> Engine:
    """The pooled engine of ``target`` in this process, made on first use."""
    engine = _engines.get(target.name)
    if engine is None:
        with _lock:
            engine = _engines.get(target.name)
            if engine is None:
                engine = _engines[target.name] = make_engine(target)
    return engine


def _forget_engines_in_child() -> None:
    # A forked worker child must not share its parent's sockets.
    global _engines, _lock
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines, _lock = {}, threading.Lock()


os.register_at_fork(after_in_child=_forget_engines_in_child)


def make_engine(target: Target) -> Engine:
    url = target.database_url()
    backend = url.get_backend_name()
    if backend == "sqlite":
        # The busy timeout: a locked database is waited for as long as a statement may run.
        return create_engine(url, connect_args={"timeout": target.timeout})
    engine = create_engine(
        url, pool_size=target.pool_size, max_overflow=target.pool_size, pool_recycle=1800, pool_timeout=10
    )
    guard = not target.allow_private_network
    connect = _postgres_connect if backend == "postgresql" else _mysql_connect

    @event.listens_for(engine, "do_connect")
    def _do_connect(dialect: Any, _record: Any, cargs: list[Any], cparams: dict[str, Any]) -> Any:
        return connect(target, guard, dialect, cargs, cparams)

    return engine


def _postgres_connect(
    target: Target, guard: bool, _dialect: Any, _cargs: list[Any], cparams: dict[str, Any]
) -> None:
    # https://www.postgresql.org/docs/current/libpq-connect.html: with both host and hostaddr,
    # libpq connects to hostaddr and still verifies the server certificate against host.
    cparams["options"] = " ".join(
        filter(None, [cparams.get("options"), f"-c statement_timeout={int(target.timeout * 1000)}"])
    )
    cparams["connect_timeout"] = max(2, math.ceil(target.connect_timeout))
    cparams.setdefault("application_name", "agent-integrations")
    if guard:
        host = str(cparams.get("host") or "")
        if not host or host.startswith("/") or "," in host:
            raise BlockedAddress(
                "the SSRF guard needs one network host name (a socket or a host list is not judged)"
            )
        cparams["hostaddr"] = ssrf.resolve(host, int(cparams.get("port") or 5432), target.allowed_networks)


def _mysql_connect(
    target: Target, guard: bool, dialect: Any, cargs: list[Any], cparams: dict[str, Any]
) -> Any:
    # https://mariadb.com/kb/en/aborting-statements/: max_statement_time is in seconds.
    cparams["init_command"] = f"SET SESSION max_statement_time={target.timeout:g}"
    cparams["connect_timeout"] = target.connect_timeout
    # A backstop on the client's side, for a network that goes silent.
    cparams["read_timeout"] = cparams["write_timeout"] = target.timeout + target.connect_timeout + 5
    if not guard:
        return None
    if cparams.get("unix_socket"):
        raise BlockedAddress("the SSRF guard needs a network host (a socket is not judged)")
    host, port = str(cparams.get("host") or "localhost"), int(cparams.get("port") or 3306)
    address = ssrf.resolve(host, port, target.allowed_networks)
    # PyMySQL connects over a socket it is given: to the judged address, while it keeps the
    # host name for TLS verification.
    sock = socket.create_connection((address, port), timeout=target.connect_timeout)
    conn = dialect.loaded_dbapi.connect(*cargs, **cparams, defer_connect=True)
    conn.connect(sock)
    return conn


@contextmanager
def transaction(conn: Connection, read_only: bool, timeout: float) -> Iterator[None]:
    """A transaction that commits when the block ends; read-only when asked. On SQLite, the
    statement timeout too (Postgres and MariaDB have theirs on the session)."""
    backend = conn.dialect.name
    if backend != "sqlite":
        with conn.begin():
            if read_only:
                # https://www.postgresql.org/docs/current/sql-set-transaction.html; on MariaDB,
                # START TRANSACTION READ ONLY also ends whatever the driver had begun implicitly.
                conn.exec_driver_sql(
                    "SET TRANSACTION READ ONLY" if backend == "postgresql" else "START TRANSACTION READ ONLY"
                )
            yield
        return
    raw: Any = conn.connection.dbapi_connection
    deadline = time.monotonic() + timeout
    # https://docs.python.org/3/library/sqlite3.html#sqlite3.Connection.set_progress_handler:
    # a true return aborts the statement with "interrupted".
    raw.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
    if read_only:
        raw.execute("PRAGMA query_only = ON")  # https://sqlite.org/pragma.html#pragma_query_only
    try:
        with conn.begin():
            yield
    finally:
        raw.set_progress_handler(None, 0)
        if read_only:
            raw.execute("PRAGMA query_only = OFF")


# ---- values ----------------------------------------------------------------------------------


def json_value(v: Any) -> Any:
    """A column's value as JSON: dates and times ISO 8601, decimals and UUIDs as strings,
    bytes as base64, intervals as ISO 8601 durations, arrays and JSON documents as such."""
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, dt.date | dt.time):  # datetime is a date
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        seconds = f"{v.total_seconds():.6f}".rstrip("0").rstrip(".")
        return f"PT{seconds}S"
    if isinstance(v, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(v)).decode()
    if isinstance(v, dict):
        return {str(k): json_value(x) for k, x in v.items()}
    if isinstance(v, list | tuple | set | frozenset):
        return [json_value(x) for x in v]
    if isinstance(v, Decimal | UUID):
        return str(v)
    return str(v)  # network addresses, ranges, enums of a driver
