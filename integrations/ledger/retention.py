"""Pruning the ledger: what finished before a bound goes, a small batch per transaction.

Each batch is one ``DELETE`` of at most ``batch`` rows chosen by an index (their children go
with them by the schema's ``ON DELETE CASCADE``), committed on its own: no lock is held for
longer than one batch, so workers, the receiver and beat keep writing while a large ledger is
pruned (on SQLite, each batch holds the write lock for milliseconds). Only what is settled
goes: finished jobs, dispatched events whose handlings all finished, finished deliveries;
health checks and breaker events by their time.

A job pruned takes its idempotency key with it: the same key submitted again makes a new job.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, delete, exists, select
from sqlalchemy.sql.elements import ColumnElement

from integrations.ledger.db import get_engine
from integrations.ledger.models import (
    TERMINAL,
    BreakerEvent,
    Delivery,
    DeliveryStatus,
    Event,
    EventHandling,
    HandlingStatus,
    HealthCheck,
    Job,
    utcnow,
)

jobs = cast(Table, Job.__table__)
events = cast(Table, Event.__table__)
handlings = cast(Table, EventHandling.__table__)
deliveries = cast(Table, Delivery.__table__)
health_checks = cast(Table, HealthCheck.__table__)
breaker_events = cast(Table, BreakerEvent.__table__)

#: Rows per DELETE (and per transaction).
BATCH = 1000


@dataclass
class Pruned:
    """What one prune deleted (children counted with their parents), and whether it got
    through everything older than the bound (``False``: stopped at its time limit)."""

    counts: dict[str, int] = field(default_factory=dict)
    complete: bool = True
    batches: int = 0
    #: The longest batch's duration (s): how long a lock was held at most.
    longest_batch: float = 0.0


def _targets(before: dt.datetime) -> dict[str, tuple[Table, Any, list[ColumnElement[bool]]]]:
    """Per kind of row: its table, its key, and what makes a row old enough to go. Every
    condition is also checked by the DELETE itself, so a row that changed since it was
    chosen (a delivery sent again) stays."""
    j, e, h, d = jobs.c, events.c, handlings.c, deliveries.c
    # Named, not "not finished": the few open handlings are then found by their status index.
    open_handling = exists().where(
        h.event_id == e.id,
        h.status.in_((HandlingStatus.QUEUED, HandlingStatus.RUNNING, HandlingStatus.RETRYING)),
    )
    return {
        # A job finishes after it is made: created_at < before narrows the search to an index
        # range (ix_jobs_created_at), finished_at < before is the rule.
        "jobs": (jobs, j.id, [j.created_at < before, j.finished_at < before, j.status.in_(TERMINAL)]),
        "events": (events, e.id, [e.received_at < before, e.dispatched_at.is_not(None), ~open_handling]),
        "deliveries": (
            deliveries,
            d.id,
            [d.finished_at < before, d.status.in_((DeliveryStatus.SUCCEEDED, DeliveryStatus.FAILED))],
        ),
        "health_checks": (health_checks, health_checks.c.id, [health_checks.c.checked_at < before]),
        "breaker_events": (breaker_events, breaker_events.c.id, [breaker_events.c.at < before]),
    }


def prune(
    older_than: dt.timedelta,
    *,
    batch: int = BATCH,
    time_limit: float | None = None,
    now: dt.datetime | None = None,
) -> Pruned:
    """Delete what finished more than ``older_than`` ago: finished jobs with their attempts,
    dispatched events whose handlings all finished with those handlings, finished deliveries
    with their attempts, health checks and breaker events.

    Stops starting new batches after ``time_limit`` seconds (``complete`` is then ``False``;
    the next run goes on where this one stopped).
    """
    if older_than <= dt.timedelta(0):
        raise ValueError("older_than must be positive")
    before = (now or utcnow()) - older_than
    deadline = None if time_limit is None else time.monotonic() + time_limit
    out = Pruned()
    engine = get_engine()
    for name, (table, key, old) in _targets(before).items():
        out.counts[name] = 0
        while True:
            if deadline is not None and time.monotonic() > deadline:
                out.complete = False
                return out
            started = time.monotonic()
            with engine.begin() as conn:
                # The ids first, then a DELETE by primary key: a plan that stays one index
                # range and n key look-ups however large the table (a DELETE ... IN (SELECT
                # ... LIMIT) may be planned as a scan of the whole table per batch).
                ids = list(conn.execute(select(key).where(*old).limit(batch)).scalars())
                if ids:
                    out.counts[name] += conn.execute(delete(table).where(key.in_(ids), *old)).rowcount
            out.longest_batch = max(out.longest_batch, time.monotonic() - started)
            out.batches += 1
            if len(ids) < batch:
                break
    return out
