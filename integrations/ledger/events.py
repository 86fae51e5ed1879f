"""Reads and writes of incoming events and their handlings."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from integrations.events import Event as EventView
from integrations.ledger.db import get_engine, retried
from integrations.ledger.models import Event, EventHandling, HandlingStatus, utcnow

events = cast(Table, Event.__table__)
handlings = cast(Table, EventHandling.__table__)

_OPEN = (HandlingStatus.QUEUED, HandlingStatus.RETRYING)


def store_event(source: str, delivery_id: str, event_type: str, payload: Any) -> str | None:
    """Store a verified event; return its id, or ``None`` when this delivery is already stored."""
    event_id = str(uuid.uuid4())
    row = {
        "id": event_id,
        "source": source,
        "delivery_id": delivery_id[:255],
        "event_type": event_type[:200],
        "payload": payload,
        "received_at": utcnow(),
    }
    try:
        with get_engine().begin() as conn:
            conn.execute(insert(events), row)
    except IntegrityError:
        return None
    return event_id


@dataclass(frozen=True)
class NewEvent:
    """A verified delivery to store: :func:`store_events` takes many at once."""

    source: str
    delivery_id: str
    event_type: str
    payload: Any


def store_events(new: Sequence[NewEvent]) -> list[str | None]:
    """Store verified events in one statement and one commit; for each, in order, its new id,
    or ``None`` when its delivery is already stored (before, or earlier in ``new``).

    One ``INSERT ... ON CONFLICT DO NOTHING RETURNING id`` (Postgres, SQLite >= 3.35): the
    commit, the durable part of a write, is shared by every event of the batch. Raises as
    :func:`store_event` does, for the whole batch.
    """
    if not new:
        return []
    now = utcnow()
    rows = [
        {
            "id": str(uuid.uuid4()),
            "source": e.source,
            "delivery_id": e.delivery_id[:255],
            "event_type": e.event_type[:200],
            "payload": e.payload,
            "received_at": now,
        }
        for e in new
    ]
    engine = get_engine()
    statement = _STORE_MANY[engine.dialect.name]
    with engine.begin() as conn:
        # Many rows with RETURNING: SQLAlchemy sends them as one multi-row INSERT.
        stored = set(conn.execute(statement, rows).scalars())
    return [r["id"] if r["id"] in stored else None for r in rows]


#: The statement of :func:`store_events` per dialect, built once.
_STORE_MANY = {
    name: dialect.insert(events)
    .on_conflict_do_nothing(index_elements=["source", "delivery_id"])
    .returning(events.c.id)
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}


def forget_event(event_id: str) -> None:
    """Remove an event that could not be queued, so the sender's redelivery is stored again."""
    with get_engine().begin() as conn:
        conn.execute(delete(events).where(events.c.id == event_id))


def _view(row: Any) -> EventView:
    return EventView(row.id, row.source, row.event_type, row.payload, row.received_at)


def get_event(event_id: str) -> EventView | None:
    with get_engine().connect() as conn:
        row = conn.execute(select(events).where(events.c.id == event_id)).one_or_none()
    return _view(row) if row else None


@retried
def start_dispatch(event_id: str, handler_names: list[str]) -> list[int]:
    """Record one handling per handler (once, however often this runs) and mark the event
    dispatched; return the handlings still to run."""
    now = utcnow()
    with get_engine().begin() as conn:
        have = set(
            conn.execute(select(handlings.c.handler).where(handlings.c.event_id == event_id)).scalars()
        )
        new = [
            {"event_id": event_id, "handler": h, "status": HandlingStatus.QUEUED, "attempts": 0}
            | {"created_at": now, "updated_at": now}
            for h in handler_names
            if h not in have
        ]
        if new:
            conn.execute(insert(handlings), new)
        conn.execute(
            update(events)
            .where(events.c.id == event_id, events.c.dispatched_at.is_(None))
            .values(dispatched_at=now)
        )
        return list(
            conn.execute(
                select(handlings.c.id).where(handlings.c.event_id == event_id, handlings.c.status.in_(_OPEN))
            ).scalars()
        )


@dataclass(frozen=True)
class HandlingClaim:
    handling_id: int
    handler: str
    event: EventView
    attempt: int


@retried
def claim_handling(handling_id: int) -> HandlingClaim | None:
    """Mark a queued or retrying handling running; ``None`` when it is not (already done, or
    taken by a duplicate message)."""
    now = utcnow()
    with get_engine().begin() as conn:
        row = conn.execute(
            update(handlings)
            .where(handlings.c.id == handling_id, handlings.c.status.in_(_OPEN))
            .values(status=HandlingStatus.RUNNING, attempts=handlings.c.attempts + 1, updated_at=now)
            .returning(handlings.c.event_id, handlings.c.handler, handlings.c.attempts)
        ).one_or_none()
        if row is None:
            return None
        event = conn.execute(select(events).where(events.c.id == row.event_id)).one()
    return HandlingClaim(handling_id, row.handler, _view(event), row.attempts)


@retried
def finish_handling(handling_id: int, status: HandlingStatus, error: str | None = None) -> None:
    now = utcnow()
    done = status in (HandlingStatus.SUCCEEDED, HandlingStatus.FAILED)
    with get_engine().begin() as conn:
        conn.execute(
            update(handlings)
            # Only the try that holds it: a stale worker's late word changes nothing.
            .where(handlings.c.id == handling_id, handlings.c.status == HandlingStatus.RUNNING)
            .values(status=status, error=error, updated_at=now, finished_at=now if done else None)
        )


def handlings_of(event_id: str) -> list[dict[str, Any]]:
    with get_engine().connect() as conn:
        rows = conn.execute(
            select(handlings).where(handlings.c.event_id == event_id).order_by(handlings.c.handler)
        ).mappings()
        return [dict(r) for r in rows]


def list_events(source: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    q = select(events.c.id, events.c.source, events.c.event_type, events.c.delivery_id, events.c.received_at)
    if source:
        q = q.where(events.c.source == source)
    with get_engine().connect() as conn:
        return [
            dict(r) for r in conn.execute(q.order_by(events.c.received_at.desc()).limit(limit)).mappings()
        ]


def stuck(
    undispatched_before: dt.datetime,
    queued_before: dt.datetime,
    running_before: dt.datetime,
    retrying_before: dt.datetime,
    limit: int = 1000,
) -> tuple[list[str], list[int]]:
    """Events never handed to their handlers, and handlings whose message was lost."""
    h = handlings.c
    with get_engine().begin() as conn:
        event_ids = list(
            conn.execute(
                select(events.c.id)
                .where(events.c.dispatched_at.is_(None), events.c.received_at < undispatched_before)
                .limit(limit)
            ).scalars()
        )
        lost = (
            ((h.status == HandlingStatus.QUEUED) & (h.updated_at < queued_before))
            | ((h.status == HandlingStatus.RUNNING) & (h.updated_at < running_before))
            | ((h.status == HandlingStatus.RETRYING) & (h.updated_at < retrying_before))
        )
        ids = list(conn.execute(select(h.id).where(lost).limit(limit)).scalars())
        if ids:
            # A running handling whose worker died is run again.
            conn.execute(
                update(handlings)
                # Still stale: one claimed since the SELECT is running for real.
                .where(h.id.in_(ids), h.status == HandlingStatus.RUNNING, h.updated_at < running_before)
                .values(status=HandlingStatus.RETRYING, updated_at=utcnow())
            )
    return event_ids, ids
