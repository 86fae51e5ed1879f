"""A job's own life in the ledger: created (once per idempotency key), claimed by a worker,
given back, and each attempt recorded with the job's move to its next status. Hot-path writes
are single Core statements. Reading and listing jobs is in :mod:`integrations.ledger.reads`,
the sweeper's and dispatcher's queries in :mod:`integrations.ledger.sweeps`, breaker and
health-check rows in :mod:`integrations.ledger.service_health`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import JSON, Integer, Table, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from integrations.errors import InvalidParams
from integrations.ledger.db import get_engine, retried
from integrations.ledger.models import (
    TERMINAL,
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
