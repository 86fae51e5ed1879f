"""Reads and writes of mailbox cursors: how far beat has read each IMAP folder."""

from __future__ import annotations

from typing import NamedTuple, cast

from sqlalchemy import Table, insert, select, update
from sqlalchemy.exc import IntegrityError

from integrations.ledger.db import get_engine
from integrations.ledger.models import MailboxCursor, utcnow

cursors = cast(Table, MailboxCursor.__table__)


class Cursor(NamedTuple):
    """Every message up to ``last_uid`` of the folder whose UIDVALIDITY is ``uidvalidity`` has
    been stored and published. UIDs mean nothing under another UIDVALIDITY (RFC 9051, 2.3.1.1)."""

    uidvalidity: int
    last_uid: int


def get_cursor(mailbox: str) -> Cursor | None:
    """The mailbox's cursor; ``None`` before its first successful poll."""
    with get_engine().connect() as conn:
        row = conn.execute(
            select(cursors.c.uidvalidity, cursors.c.last_uid).where(cursors.c.mailbox == mailbox)
        ).one_or_none()
    return Cursor(row.uidvalidity, row.last_uid) if row else None


def set_cursor(mailbox: str, uidvalidity: int, last_uid: int) -> None:
    """Set the mailbox's cursor (insert it the first time)."""
    values = {"uidvalidity": uidvalidity, "last_uid": last_uid, "updated_at": utcnow()}
    where = cursors.c.mailbox == mailbox
    with get_engine().begin() as conn:
        if conn.execute(update(cursors).where(where).values(values)).rowcount:
            return
    try:
        with get_engine().begin() as conn:
            conn.execute(insert(cursors).values(mailbox=mailbox, **values))
    except IntegrityError:  # inserted meanwhile (only possible without the poll lock)
        with get_engine().begin() as conn:
            conn.execute(update(cursors).where(where).values(values))


def all_cursors() -> dict[str, dict[str, object]]:
    """Every mailbox's cursor with when it last moved (a successful poll), by mailbox name."""
    with get_engine().connect() as conn:
        return {r["mailbox"]: dict(r) for r in conn.execute(select(cursors)).mappings()}
