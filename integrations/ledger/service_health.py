"""A service's health rows in the ledger: the transitions of its circuit breaker and the results of
the health checks beat runs (older than :data:`HEALTH_KEEP` dropped as new ones come in). The
health view built on them is in :mod:`integrations.ledger.stats`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from sqlalchemy import Table, insert, select

from integrations.ledger.db import get_engine, retried
from integrations.ledger.models import BreakerEvent, HealthCheck, utcnow

breaker_events = cast(Table, BreakerEvent.__table__)
health_checks = cast(Table, HealthCheck.__table__)


@retried
def record_breaker_event(service: str, state: str, reason: str) -> None:
    with get_engine().begin() as conn:
        conn.execute(
            insert(breaker_events), {"service": service, "state": state, "reason": reason, "at": utcnow()}
        )


def list_breaker_events(service: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    q = select(breaker_events).order_by(breaker_events.c.at.desc(), breaker_events.c.id.desc()).limit(limit)
    if service:
        q = q.where(breaker_events.c.service == service)
    with get_engine().connect() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


# --------------------------------------------------------------------------------------------
# Health checks
# --------------------------------------------------------------------------------------------

#: Health checks older than this are dropped as new ones come in.
HEALTH_KEEP = dt.timedelta(days=7)


@retried
def record_health(
    service: str, ok: bool, status_code: int | None, latency_ms: float | None, error: str | None
) -> None:
    now = utcnow()
    with get_engine().begin() as conn:
        conn.execute(
            insert(health_checks),
            {
                "service": service,
                "ok": ok,
                "status_code": status_code,
                "latency_ms": latency_ms,
                "error": error,
                "checked_at": now,
            },
        )
        conn.execute(
            health_checks.delete().where(
                health_checks.c.service == service, health_checks.c.checked_at < now - HEALTH_KEEP
            )
        )
