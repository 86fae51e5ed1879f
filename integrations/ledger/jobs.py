"""Every read and write of the job ledger. Hot-path writes are single Core statements."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import JSON, Integer, Table, bindparam, func, insert, literal, select, update
from sqlalchemy.exc import IntegrityError

from integrations.errors import InvalidParams
from integrations.ledger.db import get_engine, retried
from integrations.ledger.models import (
    TERMINAL,
    BreakerEvent,
    HealthCheck,
    Job,
    JobAttempt,
    JobStatus,
    UTCDateTime,
    utcnow,
)

# Re-exported: ``ledger.jobs.stats()`` and ``ledger.jobs.health()`` as before.
from integrations.ledger.stats import health as health
from integrations.ledger.stats import health_of as health_of
from integrations.ledger.stats import stats as stats

jobs = cast(Table, Job.__table__)
attempts = cast(Table, JobAttempt.__table__)
breaker_events = cast(Table, BreakerEvent.__table__)
health_checks = cast(Table, HealthCheck.__table__)


@dataclass(frozen=True)
class Claim:
    """What a worker needs to run one attempt of a job it has claimed."""

    job_id: str
    service: str
    operation: str
    params: dict[str, Any]
    attempt: int
    #: The end user's connection the job acts for (kept on its row, never on the broker).
    connection: str | None = None
    #: When the job was submitted (the metrics' submit-to-outcome time).
    created_at: dt.datetime | None = None


def create_job(
    service: str,
    operation: str,
    params: dict[str, Any],
    idempotency_key: str | None,
    replay_of: str | None = None,
    agent: str | None = None,
    connection: str | None = None,
    trace_context: dict[str, str] | None = None,
) -> tuple[str, bool]:
    """Insert a queued job; return ``(job_id, created)``.

    With an ``idempotency_key`` already used for this service, nothing is inserted and the
    existing job's id is returned with ``created=False``; a key one end user's connection used
    is refused to another's (:class:`InvalidParams`), so one user never gets another's result.
    """
    job_id = str(uuid.uuid4())
    now = utcnow()
    row = {
        "id": job_id,
        "service": service,
        "operation": operation,
        "params": params,
        "idempotency_key": idempotency_key,
        "replay_of": replay_of,
        "agent": agent,
        "connection": connection,
        "trace_context": trace_context,
        "status": JobStatus.QUEUED,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
    }
    engine = get_engine()
    if idempotency_key is not None:
        existing = _find_by_key(service, idempotency_key, connection)
        if existing is not None:
            return existing, False
    try:
        with engine.begin() as conn:
            conn.execute(insert(jobs), row)
    except IntegrityError:
        # Another submitter won the race for the same key between our look-up and insert.
        existing = _find_by_key(service, idempotency_key, connection) if idempotency_key else None
        if existing is None:
            raise
        return existing, False
    return job_id, True


def _find_by_key(service: str, key: str, connection: str | None) -> str | None:
    """The job of ``service`` submitted with ``key``; refused when another connection's."""
    with get_engine().connect() as conn:
        found = conn.execute(
            select(jobs.c.id, jobs.c.connection).where(
                jobs.c.service == service, jobs.c.idempotency_key == key
            )
        ).first()
    if found is None:
        return None
    if found.connection != connection:
        raise InvalidParams("idempotency_key is already used by a job of another connection of this service")
    return str(found.id)


def fail_unqueued(job_id: str, error: str) -> None:
    """Settle a job whose message never reached the broker, so it is not left queued forever."""
    now = utcnow()
    with get_engine().begin() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status == JobStatus.QUEUED)
            .values(status=JobStatus.FAILED, error=error, finished_at=now, updated_at=now)
        )


# The hot path's statements are built once, with bound parameters, so a worker spends its
# time on the round trip rather than on building and caching SQL. (The ``b_`` prefix keeps
# parameter names apart from the column names SQLAlchemy reserves for SET and VALUES.)
_CLAIM = (
    update(jobs)
    .where(jobs.c.id == bindparam("b_job_id"), jobs.c.status.in_((JobStatus.QUEUED, JobStatus.RETRYING)))
    .values(
        status=JobStatus.RUNNING,
        attempts=jobs.c.attempts + 1,
        started_at=func.coalesce(jobs.c.started_at, bindparam("b_now", type_=UTCDateTime)),
        next_attempt_at=None,
        updated_at=bindparam("b_now", type_=UTCDateTime),
        node=bindparam("b_node"),
    )
    .returning(
        jobs.c.service, jobs.c.operation, jobs.c.params, jobs.c.attempts, jobs.c.connection, jobs.c.created_at
    )
)
_ADD_ATTEMPT = insert(attempts).values(
    job_id=bindparam("b_job_id"),
    number=bindparam("b_number"),
    outcome=bindparam("b_status"),
    status_code=bindparam("b_status_code"),
    latency_ms=bindparam("b_latency_ms"),
    error=bindparam("b_error"),
    response_excerpt=bindparam("b_excerpt"),
    started_at=bindparam("b_started_at", type_=UTCDateTime),
    finished_at=bindparam("b_now", type_=UTCDateTime),
)
_MOVE_JOB = (
    update(jobs)
    # Only the attempt the job is at: an outcome recorded late (kept aside while the ledger
    # was away) never overwrites a newer attempt's.
    .where(jobs.c.id == bindparam("b_job_id"), jobs.c.attempts == bindparam("b_number"))
    .values(
        status=bindparam("b_status"),
        status_code=bindparam("b_status_code"),
        latency_ms=bindparam("b_latency_ms"),
        error=bindparam("b_error"),
        response_excerpt=bindparam("b_excerpt"),
        updated_at=bindparam("b_now", type_=UTCDateTime),
        finished_at=bindparam("b_finished_at", type_=UTCDateTime),
        next_attempt_at=bindparam("b_next_attempt_at", type_=UTCDateTime),
        meta=bindparam("b_meta", type_=JSON),
        input_tokens=func.coalesce(bindparam("b_input_tokens", type_=Integer), jobs.c.input_tokens),
        output_tokens=func.coalesce(bindparam("b_output_tokens", type_=Integer), jobs.c.output_tokens),
    )
)
# Postgres: both writes in one statement, so one round trip, atomic on an autocommit connection.
_RECORD_PG = _MOVE_JOB.add_cte(_ADD_ATTEMPT.cte("add_attempt"))


@retried
def claim(job_id: str, node: str | None = None) -> Claim | None:
    """Atomically move a queued or retrying job to running and count the attempt; ``node``
    (the worker node's run, :mod:`integrations.liveness`) is recorded as the job's holder.

    Returns ``None`` when the job is already running or finished, so a redelivered message
    never runs the same job twice at once.
    """
    with get_engine().begin() as conn:
        row = conn.execute(_CLAIM, {"b_job_id": job_id, "b_now": utcnow(), "b_node": node}).first()
    if row is None:
        return None
    return Claim(
        job_id,
        row.service,
        row.operation,
        row.params,
        row.attempts,
        connection=row.connection,
        created_at=row.created_at,
    )


@retried
def release(claim: Claim) -> bool:
    """Give back a claim made by a run that will not call after all (its rate-limit grant went
    stale before the call): the job waits again, and the attempt is not counted."""
    with get_engine().begin() as conn:
        res = conn.execute(
            update(jobs)
            .where(
                jobs.c.id == claim.job_id,
                jobs.c.status == JobStatus.RUNNING,
                jobs.c.attempts == claim.attempt,
            )
            .values(
                status=JobStatus.RETRYING if claim.attempt > 1 else JobStatus.QUEUED,
                attempts=claim.attempt - 1,
                updated_at=utcnow(),
                node=None,
            )
        )
    return res.rowcount == 1


def refused_fields(fields: dict[str, Any], e: BaseException) -> dict[str, Any]:
    """An outcome the database refused (a value it cannot store), cut to what it can: the
    status, the status code, and why the rest is missing."""
    return {
        **fields,
        "error": f"the ledger refused this attempt's details ({type(e).__name__}); see the worker's log",
        "response_excerpt": None,
        "meta": None,
    }


@retried
def keep_params(job_id: str, params: dict[str, Any]) -> None:
    """Replace a settled job's params (with what they carried dropped)."""
    with get_engine().begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(params=params))


def write_attempt(
    claim: Claim,
    *,
    status: JobStatus,
    started_at: dt.datetime,
    status_code: int | None,
    latency_ms: float | None,
    error: str | None,
    response_excerpt: str | None,
    next_attempt_at: dt.datetime | None = None,
    meta: dict[str, Any] | None = None,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
) -> None:
    """Store one attempt and move the job to ``status``, atomically.

    When a retry finds the attempt already stored (the first try committed but its reply was
    lost), there is nothing left to do.
    """
    now = utcnow()
    params = {
        "b_job_id": claim.job_id,
        "b_number": claim.attempt,
        "b_status": status.value,
        "b_status_code": status_code,
        "b_latency_ms": latency_ms,
        "b_error": error,
        "b_excerpt": response_excerpt,
        "b_started_at": started_at,
        "b_now": now,
        "b_finished_at": now if status in TERMINAL else None,
        "b_next_attempt_at": next_attempt_at,
        "b_meta": meta or None,
        "b_input_tokens": input_tokens,
        "b_output_tokens": output_tokens,
    }
    engine = get_engine()
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(_RECORD_PG, params)
            else:
                conn.execute(_ADD_ATTEMPT, params)
                conn.execute(_MOVE_JOB, params)
    except IntegrityError:
        pass  # uq_job_attempts_job_id_number: this attempt and its job update are in already


#: :func:`write_attempt`, retried while the database is unreachable (the worker's way).
record_attempt = retried(write_attempt)


# --------------------------------------------------------------------------------------------
# Reads (CLI, library); the statistics and the health view are in integrations.ledger.stats
# --------------------------------------------------------------------------------------------

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
