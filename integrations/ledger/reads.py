"""Reading the job ledger: one job (with its attempts), the newest jobs, the open jobs by service
and status (for the metrics exporter), and the trace contexts jobs were submitted in (for beat's
re-queueing). Every function here only reads; the writes of a job's life are in
:mod:`integrations.ledger.jobs`, the statistics and the health view in
:mod:`integrations.ledger.stats`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from sqlalchemy import Table, func, select

from integrations.ledger.db import get_engine
from integrations.ledger.models import Job, JobAttempt, JobStatus, utcnow

jobs = cast(Table, Job.__table__)
attempts = cast(Table, JobAttempt.__table__)

_SUMMARY = (
    jobs.c.id,
    jobs.c.service,
    jobs.c.operation,
    jobs.c.status,
    jobs.c.attempts,
    jobs.c.status_code,
    jobs.c.latency_ms,
    jobs.c.error,
    jobs.c.created_at,
    jobs.c.finished_at,
)


def get_job(job_id: str, with_attempts: bool = False) -> dict[str, Any] | None:
    """The whole job row (and its attempts, oldest first), or ``None``."""
    with get_engine().connect() as conn:
        row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
        if row is None:
            return None
        job = dict(row)
        if with_attempts:
            job["attempts_log"] = [
                dict(a)
                for a in conn.execute(
                    select(attempts).where(attempts.c.job_id == job_id).order_by(attempts.c.number)
                ).mappings()
            ]
    return job


def list_jobs(status: str | None = None, service: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The newest jobs first, optionally of one status and one service."""
    q = select(*_SUMMARY).order_by(jobs.c.created_at.desc()).limit(limit)
    if status:
        q = q.where(jobs.c.status == status)
    if service:
        q = q.where(jobs.c.service == service)
    with get_engine().connect() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


# --------------------------------------------------------------------------------------------
# Open jobs and trace contexts (issue 15: the metrics exporter, beat's re-queueing)
# --------------------------------------------------------------------------------------------

OPEN = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.RETRYING, JobStatus.DEFERRED)


def open_jobs(now: dt.datetime | None = None) -> dict[tuple[str, str], tuple[int, float]]:
    """``(service, status) -> (jobs, seconds since the oldest of them last moved)`` for the jobs
    not settled yet, in one grouped query (the status index finds them; settled jobs, the
    bulk of a ledger, are not read)."""
    now = now or utcnow()
    q = (
        select(jobs.c.service, jobs.c.status, func.count(), func.min(jobs.c.updated_at))
        .where(jobs.c.status.in_(OPEN))
        .group_by(jobs.c.service, jobs.c.status)
    )
    with get_engine().connect() as conn:
        rows = conn.execute(q).all()
    out: dict[tuple[str, str], tuple[int, float]] = {}
    for service, status, count, oldest in rows:  # min() keeps the column's type: aware UTC
        age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
        out[(service, str(status))] = (int(count), age)
    return out


def trace_contexts(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """The trace context each of ``job_ids`` was submitted in (those that have one)."""
    if not job_ids:
        return {}
    with get_engine().connect() as conn:
        rows = conn.execute(
            select(jobs.c.id, jobs.c.trace_context).where(
                jobs.c.id.in_(job_ids), jobs.c.trace_context.is_not(None)
            )
        ).all()
    return {job_id: dict(ctx) for job_id, ctx in rows if isinstance(ctx, dict)}
