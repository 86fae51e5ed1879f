"""Reads and writes of end users' connections and of authorizations in progress.

Tokens arrive here already encrypted (:mod:`integrations.auth.keys`); this module never sees
them in the clear. A refresh holds the row (:func:`for_refresh`): on Postgres a ``SELECT ...
FOR UPDATE`` in a transaction that also writes the new tokens, so two workers can never both
use one refresh token, even when the Redis lock that normally keeps them apart is lost; on
SQLite (one machine, where the file lock cannot be lost) a read, then a write conditional on
the row's ``version``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection as DBConnection
from sqlalchemy import Table, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from integrations.ledger.db import get_engine, retried
from integrations.ledger.models import Connection, ConnectionStatus, OAuthState, utcnow

connections = cast(Table, Connection.__table__)
states = cast(Table, OAuthState.__table__)

#: The name of a service's own token (client credentials, a fixed JWT subject or installation).
SERVICE_ROW = "*"


@dataclass(frozen=True)
class Row:
    id: int
    service: str
    name: str
    status: str
    subject: str | None
    scopes: list[str] | None
    #: The encrypted tokens (``None`` when there are none).
    tokens: str | None
    key_id: str | None
    version: int
    expires_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    refreshed_at: dt.datetime | None
    last_error: str | None


def _row(r: Any) -> Row:
    return Row(**{name: getattr(r, name) for name in Row.__dataclass_fields__})


def _where(service: str, name: str) -> Any:
    return (connections.c.service == service) & (connections.c.name == name)


def get(service: str, name: str) -> Row | None:
    with get_engine().connect() as conn:
        r = conn.execute(select(connections).where(_where(service, name))).first()
    return _row(r) if r is not None else None


@retried
def ensure(service: str, name: str, status: ConnectionStatus, subject: str | None = None) -> Row:
    """The row of ``service``/``name``, inserted with ``status`` (and ``subject``) when missing."""
    now = utcnow()
    try:
        with get_engine().begin() as conn:
            conn.execute(
                insert(connections),
                {
                    "service": service,
                    "name": name,
                    "status": status,
                    "subject": subject,
                    "version": 0,
                    "created_at": now,
                    "updated_at": now,
                },
            )
    except IntegrityError:
        pass  # there already
    row = get(service, name)
    assert row is not None
    return row


class Refresh:
    """The row of one connection, held for a refresh, and its writes.

    Every write is conditional on the version read, so on SQLite a writer that lost a race
    changes nothing (and learns it from the ``False`` it gets)."""

    def __init__(self, conn: DBConnection | None, row: Row | None) -> None:
        self._conn = conn
        self.row = row

    def _write(self, **values: Any) -> bool:
        assert self.row is not None
        stmt = (
            update(connections)
            .where(connections.c.id == self.row.id, connections.c.version == self.row.version)
            .values(updated_at=utcnow(), **values)
        )
        if self._conn is not None:
            return bool(self._conn.execute(stmt).rowcount == 1)
        with get_engine().begin() as conn:
            return bool(conn.execute(stmt).rowcount == 1)

    def store(
        self, tokens: str, key_id: str, expires_at: dt.datetime | None, scopes: list[str] | None
    ) -> bool:
        """New tokens (access and refresh together, one write): the connection is active."""
        assert self.row is not None
        return self._write(
            tokens=tokens,
            key_id=key_id,
            expires_at=expires_at,
            scopes=scopes if scopes is not None else self.row.scopes,
            version=self.row.version + 1,
            status=ConnectionStatus.ACTIVE,
            refreshed_at=utcnow(),
            last_error=None,
        )

    def needs_reauth(self, reason: str) -> bool:
        return self._write(status=ConnectionStatus.NEEDS_REAUTH, last_error=reason[:1000])

    def failed(self, reason: str) -> bool:
        """A refresh that failed for now (the token endpoint is down): noted, status unchanged."""
        return self._write(last_error=reason[:1000])

    def reset(self, subject: str | None) -> bool:
        """A connection that acts as ``subject`` from now on (its tokens are got anew)."""
        assert self.row is not None
        return self._write(
            subject=subject,
            tokens=None,
            key_id=None,
            expires_at=None,
            status=ConnectionStatus.ACTIVE,
            version=self.row.version + 1,
            last_error=None,
        )

    def revoke(self) -> bool:
        assert self.row is not None
        return self._write(
            tokens=None,
            key_id=None,
            expires_at=None,
            status=ConnectionStatus.REVOKED,
            version=self.row.version + 1,
            last_error=None,
        )


@contextlib.contextmanager
def for_refresh(service: str, name: str) -> Iterator[Refresh]:
    """Hold the connection's row while its tokens are refreshed; the writes made through the
    :class:`Refresh` commit when the block ends (and roll back if it raises)."""
    engine = get_engine()
    if engine.dialect.name != "postgresql":
        yield Refresh(None, get(service, name))
        return
    # A transaction of its own: the engine's connections autocommit each statement, which
    # would release the row lock at once.
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="READ COMMITTED")
        with conn.begin():
            r = conn.execute(select(connections).where(_where(service, name)).with_for_update()).first()
            yield Refresh(conn, _row(r) if r is not None else None)


def list_connections(service: str | None = None, name: str | None = None) -> list[Row]:
    q = select(connections).order_by(connections.c.service, connections.c.name)
    if service:
        q = q.where(connections.c.service == service)
    if name:
        q = q.where(connections.c.name == name)
    with get_engine().connect() as conn:
        return [_row(r) for r in conn.execute(q)]


# --------------------------------------------------------------------------------------------
# Authorizations in progress (the ``state`` of the authorization-code flow)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    service: str
    connection: str
    verifier: str
    key_id: str
    redirect_uri: str
    expires_at: dt.datetime


def add_state(
    state_hash: str, service: str, connection: str, verifier: str, key_id: str, redirect_uri: str, ttl: float
) -> None:
    now = utcnow()
    with get_engine().begin() as conn:
        # Authorizations never completed go when the next one starts.
        conn.execute(delete(states).where(states.c.expires_at < now))
        conn.execute(
            insert(states),
            {
                "state_hash": state_hash,
                "service": service,
                "connection": connection,
                "verifier": verifier,
                "key_id": key_id,
                "redirect_uri": redirect_uri,
                "created_at": now,
                "expires_at": now + dt.timedelta(seconds=ttl),
            },
        )


def take_state(state_hash: str) -> State | None:
    """Remove and return the authorization ``state_hash`` stands for: a state is used once,
    whoever presents it (one statement, so two callbacks with one state cannot both get it)."""
    with get_engine().begin() as conn:
        r = conn.execute(
            delete(states)
            .where(states.c.state_hash == state_hash)
            .returning(
                states.c.service,
                states.c.connection,
                states.c.verifier,
                states.c.key_id,
                states.c.redirect_uri,
                states.c.expires_at,
            )
        ).first()
    return State(*r) if r is not None else None


# --------------------------------------------------------------------------------------------
# Key rotation
# --------------------------------------------------------------------------------------------


def encrypted_rows(
    primary: str, after: tuple[str, Any], limit: int
) -> list[tuple[str, Any, str, int | None]]:
    """``(table, key, ciphertext, version)`` of up to ``limit`` encrypted values not under key
    ``primary``, after ``after`` (``(table, key)``) in the order connections, then states."""
    out: list[tuple[str, Any, str, int | None]] = []
    table, last = after
    with get_engine().connect() as conn:
        if table == "connections":
            rows = conn.execute(
                select(connections.c.id, connections.c.tokens, connections.c.version)
                .where(
                    connections.c.tokens.is_not(None),
                    connections.c.key_id != primary,
                    connections.c.id > (last or 0),
                )
                .order_by(connections.c.id)
                .limit(limit)
            ).all()
            out += [("connections", r.id, r.tokens, r.version) for r in rows]
            if len(out) == limit:
                return out
            last = ""
        pending = conn.execute(
            select(states.c.state_hash, states.c.verifier)
            .where(states.c.key_id != primary, states.c.state_hash > (last or ""))
            .order_by(states.c.state_hash)
            .limit(limit - len(out))
        ).all()
        out += [("oauth_states", r.state_hash, r.verifier, None) for r in pending]
    return out


def replace_encrypted(table: str, key: Any, old: str, version: int | None, new: str, key_id: str) -> bool:
    """Swap one encrypted value for the same value under another key, unless the row changed
    since it was read (a worker refreshed its tokens meanwhile: they are under the newest key)."""
    if table == "connections":
        stmt = update(connections).where(
            connections.c.id == key, connections.c.tokens == old, connections.c.version == version
        )
        stmt = stmt.values(tokens=new, key_id=key_id)
    else:
        stmt = (
            update(states)
            .where(states.c.state_hash == key, states.c.verifier == old)
            .values(verifier=new, key_id=key_id)
        )
    with get_engine().begin() as conn:
        return bool(conn.execute(stmt).rowcount == 1)


def key_counts() -> dict[str, int]:
    """How many encrypted values each key holds."""
    counts: dict[str, int] = {}
    with get_engine().connect() as conn:
        for table, col, key_col in (
            (connections, connections.c.tokens, connections.c.key_id),
            (states, states.c.verifier, states.c.key_id),
        ):
            q = select(key_col, func.count()).select_from(table).where(col.is_not(None)).group_by(key_col)
            for key_id, n in conn.execute(q):
                counts[str(key_id)] = counts.get(str(key_id), 0) + int(n)
    return counts
