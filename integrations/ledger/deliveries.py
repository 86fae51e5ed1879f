"""Reads and writes of outgoing webhooks: endpoints, deliveries and every attempt at them.

The retry schedule lives here: a delivery waiting for its next try is ``pending`` with a
``next_attempt_at``, and beat's dispatcher queues the ones that are due.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, and_, func, insert, select, update

from integrations.ledger.db import get_engine, retried
from integrations.ledger.models import Delivery, DeliveryAttempt, DeliveryStatus, Endpoint, utcnow

endpoints = cast(Table, Endpoint.__table__)
deliveries = cast(Table, Delivery.__table__)
attempts = cast(Table, DeliveryAttempt.__table__)

_SHOWN = [c for c in endpoints.c if c.name != "secret"]


def add_endpoint(url: str, secret: str, event_types: list[str], description: str | None) -> str:
    endpoint_id = "ep_" + uuid.uuid4().hex[:16]
    with get_engine().begin() as conn:
        conn.execute(
            insert(endpoints),
            {
                "id": endpoint_id,
                "url": url,
                "secret": secret,
                "event_types": event_types,
                "description": description,
                "enabled": True,
                "created_at": utcnow(),
            },
        )
    return endpoint_id


def list_endpoints() -> list[dict[str, Any]]:
    """Every endpoint, without its secret."""
    with get_engine().connect() as conn:
        return [dict(r) for r in conn.execute(select(*_SHOWN).order_by(endpoints.c.created_at)).mappings()]


def subscribed_endpoints() -> list[tuple[str, list[str]]]:
    """``(id, event_types)`` of each enabled endpoint."""
    with get_engine().connect() as conn:
        rows = conn.execute(select(endpoints.c.id, endpoints.c.event_types).where(endpoints.c.enabled))
        return [(r.id, list(r.event_types)) for r in rows]


@retried
def set_enabled(endpoint_id: str, enabled: bool, reason: str | None = None) -> bool:
    """Enable or disable an endpoint; ``False`` when there is no such endpoint."""
    with get_engine().begin() as conn:
        done = conn.execute(
            update(endpoints)
            .where(endpoints.c.id == endpoint_id)
            .values(enabled=enabled, disabled_reason=None if enabled else reason)
            .values(**({"failing_since": None} if enabled else {}))
        )
    return bool(done.rowcount)


def create_deliveries(event_type: str, body: str, endpoint_ids: list[str]) -> list[str]:
    """One pending delivery per endpoint, due now; return their ids (the ``webhook-id``)."""
    now = utcnow()
    ids = ["msg_" + uuid.uuid4().hex for _ in endpoint_ids]
    rows = [
        {
            "id": delivery_id,
            "endpoint_id": endpoint_id,
            "event_type": event_type,
            "body": body,
            "status": DeliveryStatus.PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "queued_at": now,  # the publisher queues the first try at once
            "created_at": now,
            "updated_at": now,
        }
        for delivery_id, endpoint_id in zip(ids, endpoint_ids, strict=True)
    ]
    if rows:
        with get_engine().begin() as conn:
            conn.execute(insert(deliveries), rows)
    return ids


@dataclass(frozen=True)
class DeliveryClaim:
    delivery_id: str
    attempt: int
    body: str
    endpoint_id: str
    url: str
    secret: str
    enabled: bool
    #: The endpoint's first failure since its last success; ``None`` while it is healthy.
    failing_since: dt.datetime | None


@retried
def claim(delivery_id: str, now: dt.datetime) -> DeliveryClaim | None:
    """Take a due pending delivery for one try; ``None`` when it is not due or already taken."""
    d, e = deliveries.c, endpoints.c
    with get_engine().begin() as conn:
        row = conn.execute(
            update(deliveries)
            .where(d.id == delivery_id, d.status == DeliveryStatus.PENDING, d.next_attempt_at <= now)
            .values(status=DeliveryStatus.SENDING, attempts=d.attempts + 1, updated_at=now)
            .returning(d.attempts, d.body, d.endpoint_id)
        ).one_or_none()
        if row is None:
            return None
        ep = conn.execute(
            select(e.url, e.secret, e.enabled, e.failing_since).where(e.id == row.endpoint_id)
        ).one()
    return DeliveryClaim(
        delivery_id, row.attempts, row.body, row.endpoint_id, ep.url, ep.secret, ep.enabled, ep.failing_since
    )


@retried
def record(
    claim: DeliveryClaim,
    *,
    ok: bool,
    status_code: int | None,
    duration_ms: float | None,
    error: str | None,
    excerpt: str | None,
    next_attempt_at: dt.datetime | None,
) -> str | None:
    """Record one try and settle the delivery: succeeded, pending again (``next_attempt_at``) or
    failed. Returns the delivery's new status; ``None`` when the try was no longer the
    delivery's current one (its worker was presumed lost and the delivery tried again)."""
    now = utcnow()
    if ok:
        status = DeliveryStatus.SUCCEEDED
    elif next_attempt_at is not None:
        status = DeliveryStatus.PENDING
    else:
        status = DeliveryStatus.FAILED
    d, e = deliveries.c, endpoints.c
    with get_engine().begin() as conn:
        if not conn.execute(
            select(attempts.c.id).where(
                attempts.c.delivery_id == claim.delivery_id, attempts.c.number == claim.attempt
            )
        ).first():
            conn.execute(
                insert(attempts),
                {
                    "delivery_id": claim.delivery_id,
                    "number": claim.attempt,
                    "ok": ok,
                    "status_code": status_code,
                    "duration_ms": duration_ms,
                    "error": error,
                    "response_excerpt": excerpt,
                    "at": now,
                },
            )
        settled = conn.execute(
            update(deliveries)
            .where(
                d.id == claim.delivery_id,
                d.status == DeliveryStatus.SENDING,
                d.attempts == claim.attempt,
            )
            .values(
                status=status,
                next_attempt_at=next_attempt_at,
                queued_at=None,
                last_status_code=status_code,
                last_error=error,
                updated_at=now,
                finished_at=None if status == DeliveryStatus.PENDING else now,
            )
        )
        endpoint = update(endpoints).where(e.id == claim.endpoint_id)
        if ok:
            conn.execute(endpoint.values(last_success_at=now, failing_since=None))
        else:
            conn.execute(endpoint.values(failing_since=func.coalesce(e.failing_since, now)))
    return status if settled.rowcount else None


def due(
    now: dt.datetime,
    sending_before: dt.datetime,
    queued_before: dt.datetime,
    max_attempts: int,
    limit: int = 1000,
) -> list[str]:
    """Deliveries whose next try is due and not already on the queue (or queued before
    ``queued_before`` and still not taken), oldest first; they are marked queued.

    A try whose worker was lost (sending since before ``sending_before``) is due again, unless
    it was the last try of the schedule: then the delivery has failed.
    """
    d = deliveries.c
    lost = (d.status == DeliveryStatus.SENDING) & (d.updated_at < sending_before)
    with get_engine().begin() as conn:
        conn.execute(
            update(deliveries)
            .where(lost, d.attempts >= max_attempts)
            .values(
                status=DeliveryStatus.FAILED,
                last_error="the worker was lost during the last try",
                updated_at=now,
                finished_at=now,
            )
        )
        conn.execute(
            update(deliveries)
            .where(lost)
            .values(status=DeliveryStatus.PENDING, next_attempt_at=now, queued_at=None, updated_at=now)
        )
        ids = list(
            conn.execute(
                select(d.id)
                .where(
                    d.status == DeliveryStatus.PENDING,
                    d.next_attempt_at <= now,
                    d.queued_at.is_(None) | (d.queued_at < queued_before),
                )
                .order_by(d.next_attempt_at)
                .limit(limit)
            ).scalars()
        )
        if ids:
            conn.execute(update(deliveries).where(d.id.in_(ids)).values(queued_at=now))
    return ids


def redeliver(delivery_id: str) -> str | None:
    """Make a finished delivery due now for one more try (same ``webhook-id``). Returns why it
    cannot be (no such delivery, still in flight, endpoint disabled), else ``None``."""
    d, e = deliveries.c, endpoints.c
    now = utcnow()
    with get_engine().begin() as conn:
        row = conn.execute(
            select(d.status, e.enabled).join(endpoints, e.id == d.endpoint_id).where(d.id == delivery_id)
        ).one_or_none()
        if row is None:
            return f"no delivery with id {delivery_id}"
        if not row.enabled:
            return "its endpoint is disabled; enable it first ('integrations endpoints enable')"
        done = conn.execute(
            update(deliveries)
            .where(d.id == delivery_id, d.status.in_((DeliveryStatus.SUCCEEDED, DeliveryStatus.FAILED)))
            .values(
                status=DeliveryStatus.PENDING,
                next_attempt_at=now,
                queued_at=now,
                finished_at=None,
                updated_at=now,
            )
        )
        if not done.rowcount:
            return "it is still being delivered"
    return None


def list_deliveries(
    endpoint_id: str | None = None, status: str | None = None, limit: int = 20
) -> list[dict[str, Any]]:
    d = deliveries.c
    q = select(
        d.id,
        d.endpoint_id,
        d.event_type,
        d.status,
        d.attempts,
        d.last_status_code,
        d.next_attempt_at,
        d.created_at,
    )
    conds = []
    if endpoint_id:
        conds.append(d.endpoint_id == endpoint_id)
    if status:
        conds.append(d.status == status)
    if conds:
        q = q.where(and_(*conds))
    with get_engine().connect() as conn:
        return [dict(r) for r in conn.execute(q.order_by(d.created_at.desc()).limit(limit)).mappings()]


def attempts_of(delivery_id: str) -> list[dict[str, Any]]:
    with get_engine().connect() as conn:
        rows = conn.execute(
            select(attempts).where(attempts.c.delivery_id == delivery_id).order_by(attempts.c.number)
        ).mappings()
        return [dict(r) for r in rows]


def get_delivery(delivery_id: str) -> dict[str, Any] | None:
    with get_engine().connect() as conn:
        row = conn.execute(select(deliveries).where(deliveries.c.id == delivery_id)).mappings().one_or_none()
    return dict(row) if row else None
