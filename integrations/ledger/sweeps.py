"""The ways a job gets back to the queue without its message: parked (deferred) jobs that beat's
dispatcher queues when their time comes (or when their service's breaker closes), and the
sweeper's queries for jobs presumed lost (stuck past their status's bound, or held by a worker
node that is gone), each reset by a conditional update so two sweepers never take the same job.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection, Iterator
from typing import Any, cast

from sqlalchemy import Table, insert, literal, select, update

from integrations.ledger.db import get_engine, retried
from integrations.ledger.models import Job, JobAttempt, JobStatus, UTCDateTime, utcnow

jobs = cast(Table, Job.__table__)
attempts = cast(Table, JobAttempt.__table__)


def stuck_jobs(
    now: dt.datetime,
    queued_before: dt.datetime,
    running_before: dt.datetime,
    retrying_before: dt.datetime,
    limit: int = 500,
) -> list[tuple[str, str, str | None]]:
    """``(job_id, service, agent)`` of jobs whose message is presumed lost, once reset for a new one.

    Untouched since before the bound of their status: queued (lost message, emptied broker),
    running (worker killed: past the task time limit no worker can still be at it), retrying
    (past the longest countdown). A running job goes back to retrying. The reset is a
    conditional update, so two sweepers never both take the same job.
    """
    with get_engine().begin() as conn:
        rows = conn.execute(
            select(*_STUCK)
            .where(
                ((jobs.c.status == JobStatus.QUEUED) & (jobs.c.updated_at < queued_before))
                | ((jobs.c.status == JobStatus.RUNNING) & (jobs.c.updated_at < running_before))
                | ((jobs.c.status == JobStatus.RETRYING) & (jobs.c.updated_at < retrying_before))
            )
            .order_by(jobs.c.updated_at)
            .limit(limit)
        ).all()
        return _reset(conn, rows, now)


_STUCK = (jobs.c.id, jobs.c.service, jobs.c.agent, jobs.c.status, jobs.c.updated_at, jobs.c.attempts)


def _reset(conn: Any, rows: Any, now: dt.datetime) -> list[tuple[str, str, str | None]]:
    """Reset each of ``rows`` (:data:`_STUCK` columns) for a new message, unless it moved since
    it was read; record the attempt of a running one as lost. The ``(id, service, agent)`` reset."""
    found: list[tuple[str, str, str | None]] = []
    for job_id, service, agent, status, updated_at, attempt in rows:
        res = conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status == status, jobs.c.updated_at == updated_at)
            .values(
                status=JobStatus.RETRYING if status != JobStatus.QUEUED else JobStatus.QUEUED,
                updated_at=now,
                node=None,
            )
        )
        if res.rowcount == 1:
            found.append((job_id, service, agent))
            if status == JobStatus.RUNNING and attempt > 0:
                _record_lost(conn, job_id, attempt, updated_at, now)
    return found


def running_nodes() -> set[str]:
    """The worker nodes that hold running jobs, as the ledger knows them."""
    with get_engine().connect() as conn:
        return set(
            conn.execute(
                select(jobs.c.node)
                .where(jobs.c.status == JobStatus.RUNNING, jobs.c.node.is_not(None))
                .distinct()
            ).scalars()
        )


def jobs_of_lost_nodes(
    now: dt.datetime,
    nodes: Collection[str],
    held: Collection[str],
    attempt_time: Callable[[str], float],
) -> list[tuple[str, str, str | None]]:
    """``(job_id, service, agent)`` of the jobs lost with worker ``nodes``, once reset for a
    new message: those they claimed (running, their attempt counted as lost) once the attempt's
    own time is up (``attempt_time(service)`` seconds after the claim: the call it made cannot
    still be waited for), and the ``held`` ones (messages they had received) still waiting."""
    if not nodes and not held:
        return []
    with get_engine().begin() as conn:
        rows = []
        if nodes:
            running = conn.execute(
                select(*_STUCK).where(jobs.c.status == JobStatus.RUNNING, jobs.c.node.in_(list(nodes)))
            ).all()
            rows += [
                r for r in running if r.updated_at <= now - dt.timedelta(seconds=attempt_time(r.service))
            ]
        for chunk in _chunks(list(held), 500):
            rows += conn.execute(
                select(*_STUCK).where(
                    jobs.c.id.in_(chunk), jobs.c.status.in_((JobStatus.QUEUED, JobStatus.RETRYING))
                )
            ).all()
        return _reset(conn, rows, now)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _record_lost(conn: Any, job_id: str, number: int, started_at: dt.datetime, now: dt.datetime) -> None:
    """The attempt a lost worker was making: counted when claimed, so it gets its row (unless its
    outcome reached the ledger after all)."""
    exists = select(attempts.c.id).where(attempts.c.job_id == job_id, attempts.c.number == number)
    conn.execute(
        insert(attempts).from_select(
            ["job_id", "number", "outcome", "error", "started_at", "finished_at"],
            select(
                literal(job_id),
                literal(number),
                literal("lost"),
                literal("the worker running it was lost; re-queued by the sweeper"),
                literal(started_at, UTCDateTime()),
                literal(now, UTCDateTime()),
            ).where(~exists.exists()),
        )
    )


@retried
def park(job_id: str, until: dt.datetime) -> bool:
    """Set a queued or retrying job aside until ``until``; beat's dispatcher queues it then."""
    with get_engine().begin() as conn:
        res = conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status.in_((JobStatus.QUEUED, JobStatus.RETRYING)))
            .values(status=JobStatus.DEFERRED, next_attempt_at=until, updated_at=utcnow())
        )
    return res.rowcount == 1


def due_deferred(now: dt.datetime, limit: int = 1000) -> list[tuple[str, str, str | None]]:
    """``(job_id, service, agent)`` of parked jobs whose time has come, moved back to queued."""
    due: list[tuple[str, str, str | None]] = []
    with get_engine().begin() as conn:
        rows = conn.execute(
            select(jobs.c.id, jobs.c.service, jobs.c.agent)
            .where(jobs.c.status == JobStatus.DEFERRED, jobs.c.next_attempt_at <= now)
            .order_by(jobs.c.next_attempt_at)
            .limit(limit)
        ).all()
        for job_id, service, agent in rows:
            res = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status == JobStatus.DEFERRED)
                .values(status=JobStatus.QUEUED, updated_at=now)
            )
            if res.rowcount == 1:
                due.append((job_id, service, agent))
    return due


@retried
def release_deferred(service: str) -> int:
    """Make every job of ``service`` parked in the ledger due now (its breaker just closed)."""
    now = utcnow()
    with get_engine().begin() as conn:
        res = conn.execute(
            update(jobs)
            .where(
                jobs.c.service == service,
                jobs.c.status == JobStatus.DEFERRED,
                jobs.c.next_attempt_at > now,
            )
            .values(next_attempt_at=now)
        )
    return int(res.rowcount)
