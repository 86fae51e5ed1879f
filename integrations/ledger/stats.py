"""What the ledger says about the services, computed by the database: `integrations stats` and
`integrations health`.

Nothing here loads rows into Python: each answer is a grouped query whose result has one row
per service and operation (or per service), however many jobs the ledger holds.

- Postgres: ``percentile_cont`` (linear interpolation between the closest ranks). Without a
  window the groups and each group's latencies are read in order from
  ``ix_jobs_service_operation_latency_ms`` alone (an index-only scan: no sort, no visit of the
  jobs' rows); with ``since`` the window's jobs come from ``ix_jobs_created_at``.
- SQLite has no ``percentile_cont``. The grouped query counts each group's finished jobs
  (``n``); then, per group and percentile ``p``, one query reads the two latencies around the
  rank ``(n-1)p`` (``ORDER BY latency_ms LIMIT 2 OFFSET floor((n-1)p)``, walked along the same
  index, which holds every column the statistics read) and they are interpolated with
  ``percentile_cont``'s formula. The same figures as Postgres; a walk of the index per group
  rather than a sort.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Table, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from integrations.ledger.db import get_engine
from integrations.ledger.models import TERMINAL, HealthCheck, Job, JobStatus

jobs = cast(Table, Job.__table__)
health_checks = cast(Table, HealthCheck.__table__)

#: The percentiles `integrations stats` shows, by the name of their column.
PERCENTILES = {"p50_ms": 0.5, "p95_ms": 0.95}


def stats(since: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Per service and operation, of the jobs created at or after ``since`` (all without it):
    ``count``, ``succeeded``, ``failed``, ``success_rate`` (of the finished; ``None`` before
    any finished), ``p50_ms`` and ``p95_ms`` of the finished jobs' latencies (interpolated, as
    Postgres's ``percentile_cont``), and the tokens the jobs used (``input_tokens``,
    ``output_tokens``: ``None`` where no job reported any, not an LLM). Sorted by service and
    operation."""
    window = [jobs.c.created_at >= since] if since is not None else []
    c = jobs.c
    finished = c.status.in_(TERMINAL)
    totals = [
        func.count().label("count"),
        func.count().filter(c.status == JobStatus.SUCCEEDED).label("succeeded"),
        func.count().filter(c.status == JobStatus.FAILED).label("failed"),
        func.sum(c.input_tokens).label("input_tokens"),
        func.sum(c.output_tokens).label("output_tokens"),
        (func.count(c.input_tokens) + func.count(c.output_tokens)).label("reported"),
    ]
    with get_engine().connect() as conn:
        if conn.dialect.name == "postgresql":
            # percentile_cont skips the NULL latencies of jobs that never got an answer.
            totals += [
                func.percentile_cont(p).within_group(c.latency_ms).filter(finished).label(name)
                for name, p in PERCENTILES.items()
            ]
        else:
            totals.append(func.count(c.latency_ms).filter(finished).label("timed"))
        q = select(c.service, c.operation, *totals).where(*window)
        groups = conn.execute(q.group_by(c.service, c.operation).order_by(c.service, c.operation))
        rows = [dict(r) for r in groups.mappings()]
        if conn.dialect.name != "postgresql":
            for row in rows:
                _percentiles_by_offset(conn, row, [*window, finished, c.latency_ms.is_not(None)])
                del row["timed"]
    for row in rows:
        reported = row.pop("reported")
        done = row["succeeded"] + row["failed"]
        row["success_rate"] = row["succeeded"] / done if done else None
        row["input_tokens"] = (row["input_tokens"] or 0) if reported else None
        row["output_tokens"] = (row["output_tokens"] or 0) if reported else None
    return rows


def _percentiles_by_offset(conn: Connection, group: dict[str, Any], where: list[ColumnElement[bool]]) -> None:
    """SQLite: each percentile ``p`` of ``group`` from the two latencies at 0-based ranks
    ``floor((n-1)p)`` and the next (``ORDER BY latency_ms LIMIT 2 OFFSET rank``, walked along
    the stats index), interpolated as ``percentile_cont`` does."""
    c = jobs.c
    n = group["timed"]
    for name, p in PERCENTILES.items():
        group[name] = None
        if not n:
            continue
        rank = (n - 1) * p
        q = (
            select(c.latency_ms)
            .where(c.service == group["service"], c.operation == group["operation"], *where)
            .order_by(c.latency_ms)
            .limit(2)
            .offset(math.floor(rank))
        )
        values = list(conn.execute(q).scalars())
        if values:  # none when jobs were pruned since the counts were taken
            lo, hi = values[0], values[-1]
            group[name] = lo + (hi - lo) * (rank - math.floor(rank))


# --------------------------------------------------------------------------------------------
# Health checks
# --------------------------------------------------------------------------------------------


def _last(service: str, ok: bool) -> Any:
    """The id of ``service``'s newest passing (or failing) check: one step down
    ``ix_health_checks_service_ok_checked_at``."""
    h = health_checks.c
    return (
        select(h.id)
        .where(h.service == service, h.ok == ok)
        .order_by(h.checked_at.desc(), h.id.desc())
        .limit(1)
        .scalar_subquery()
    )


def health_of(services: Sequence[str], since: dt.datetime | None = None) -> list[dict[str, Any]]:
    """For each of ``services``, in that order: its latest check (``status`` healthy, unhealthy
    or unknown, ``status_code``, ``latency_ms``, ``checked_at``), when it last failed and with
    what (``last_error_at``, ``last_error``), when it last passed (``last_success_at``), and of
    its checks at or after ``since`` (all kept without it) how many ran (``checks``) and the
    share that passed (``passed``; ``None`` without checks). Two statements, whatever the
    number of services."""
    h = health_checks.c
    if not services:
        return []
    window = [h.checked_at >= since] if since is not None else []
    with get_engine().connect() as conn:
        newest = conn.execute(
            select(health_checks).where(h.id.in_([_last(s, ok) for s in services for ok in (True, False)]))
        ).mappings()
        last: dict[tuple[str, bool], Any] = {(r["service"], r["ok"]): r for r in newest}
        counts = {
            r.service: (r.checks, r.passed)
            for r in conn.execute(
                select(h.service, func.count().label("checks"), func.count().filter(h.ok).label("passed"))
                .where(h.service.in_(services), *window)
                .group_by(h.service)
            )
        }
    out = []
    for service in services:
        passed, failed = last.get((service, True)), last.get((service, False))
        latest = max((r for r in (passed, failed) if r is not None), key=_newest, default=None)
        checks, ok = counts.get(service, (0, 0))
        out.append(
            {
                "service": service,
                "status": "unknown" if latest is None else ("healthy" if latest["ok"] else "unhealthy"),
                "status_code": latest["status_code"] if latest else None,
                "latency_ms": latest["latency_ms"] if latest else None,
                "checked_at": latest["checked_at"] if latest else None,
                "last_error": failed["error"] if failed else None,
                "last_error_at": failed["checked_at"] if failed else None,
                "last_success_at": passed["checked_at"] if passed else None,
                "checks": checks,
                "passed": ok / checks if checks else None,
            }
        )
    return out


def _newest(row: Any) -> tuple[dt.datetime, int]:
    return row["checked_at"], row["id"]


def health(service: str) -> dict[str, Any]:
    """:func:`health_of` for one service."""
    return health_of([service])[0]
