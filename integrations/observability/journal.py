"""A job's events, each told once to the three: a log line, the counters, the current span.

The events and their log lines (logger ``integrations.jobs``; the JSON form carries the same
as fields: ``event``, ``job_id``, ``service``, ``operation``, ``agent``, ``attempt``,
``status_code``, ``latency_ms``, ``error_class``, and ``outcome``, ``cause``, ``wait_s``):

==========  ======  ==========================================================================
submitted   INFO    ``job <id> submitted: stub.echo by agent-7``
attempt     INFO    ``job <id> attempt 1 of stub.echo: 503 in 12.3 ms (TransientError) -> retrying``
retry       INFO    ``job <id> will be retried after attempt 1 (TransientError)``
deferral    INFO    ``job <id> of stub deferred 0.4 s (limit)``
outcome     INFO    ``job <id> succeeded after 2 attempts: stub.echo 200`` (WARNING when failed)
==========  ======  ==========================================================================

A line is built only when its level is enabled; the counters cost a few microseconds.
"""

from __future__ import annotations

import logging
from typing import Any

from integrations.ledger.jobs import Claim
from integrations.ledger.models import TERMINAL, JobStatus, utcnow
from integrations.observability import metrics, traces

log = logging.getLogger("integrations.jobs")


def _emit(level: int, message: str, **fields: Any) -> None:
    log.log(level, message, extra={"fields": {k: v for k, v in fields.items() if v is not None}})


def submitted(job_id: str, service: str, operation: str, agent: str | None) -> None:
    """A job was written and queued."""
    traces.annotate(**{"job.id": job_id, "job.service": service, "job.operation": operation})
    metrics.job_submitted(service, operation, agent)
    if log.isEnabledFor(logging.INFO):
        by = f" by {agent}" if agent else ""
        _emit(
            logging.INFO,
            f"job {job_id} submitted: {service}.{operation}{by}",
            event="submitted",
            job_id=job_id,
            service=service,
            operation=operation,
            agent=agent,
        )


def attempted(
    claim: Claim,
    agent: str | None,
    status: JobStatus,
    status_code: int | None,
    latency_ms: float | None,
    error: BaseException | None = None,
    tokens: tuple[int | None, int | None] = (None, None),
    retry_in: float | None = None,
) -> None:
    """An attempt was recorded, leaving the job ``status``: its line, then the retry's or the
    outcome's when it is one."""
    service, operation = claim.service, claim.operation
    error_class = type(error).__name__ if error is not None else None
    metrics.attempt(
        service, operation, status.value, latency_ms / 1000 if latency_ms is not None else None, status_code
    )
    metrics.tokens(service, operation, *tokens)
    traces.annotate(**{"job.attempt": claim.attempt, "job.status": status.value})
    common: dict[str, Any] = {
        "job_id": claim.job_id,
        "service": service,
        "operation": operation,
        "agent": agent,
        "attempt": claim.attempt,
        "status_code": status_code,
        "latency_ms": round(latency_ms, 3) if latency_ms is not None else None,
        "error_class": error_class,
    }
    if log.isEnabledFor(logging.INFO):
        answer = str(status_code) if status_code is not None else "no answer"
        took = f" in {latency_ms:.1f} ms" if latency_ms is not None else ""
        why = f" ({error_class})" if error_class else ""
        _emit(
            logging.INFO,
            f"job {claim.job_id} attempt {claim.attempt} of {service}.{operation}: {answer}{took}{why}"
            f" -> {status.value}",
            event="attempt",
            outcome=status.value,
            **common,
        )
    if status == JobStatus.RETRYING:
        metrics.job_retried(service, operation, error_class or "")
        if log.isEnabledFor(logging.INFO):
            after = f" in {retry_in:.0f} s" if retry_in is not None else ""
            _emit(
                logging.INFO,
                f"job {claim.job_id} will be retried{after} after attempt {claim.attempt} ({error_class})",
                event="retry",
                wait_s=retry_in,
                **common,
            )
    elif status in TERMINAL:
        seconds = (utcnow() - claim.created_at).total_seconds() if claim.created_at is not None else None
        metrics.job_finished(service, operation, status.value, agent, seconds)
        level = logging.INFO if status == JobStatus.SUCCEEDED else logging.WARNING
        if log.isEnabledFor(level):
            code = f" {status_code}" if status_code is not None else ""
            why = f" ({error_class})" if error_class else ""
            plural = "s" if claim.attempt != 1 else ""
            _emit(
                level,
                f"job {claim.job_id} {status.value} after {claim.attempt} attempt{plural}: "
                f"{service}.{operation}{code}{why}",
                event="outcome",
                outcome=status.value,
                seconds=round(seconds, 3) if seconds is not None else None,
                **common,
            )


def deferred(service: str, job_id: str, agent: str | None, wait: float, cause: str, parked: bool) -> None:
    """A run was put off without an attempt: ``cause`` is limit, pause, breaker or ledger;
    ``parked``: in the ledger for beat (a long wait) rather than a broker countdown."""
    metrics.job_deferred(service, cause, wait)
    traces.annotate(**{"job.deferred_s": round(wait, 3), "job.deferred_cause": cause})
    if log.isEnabledFor(logging.INFO):
        where = ", parked in the ledger" if parked else ""
        _emit(
            logging.INFO,
            f"job {job_id} of {service} deferred {wait:.1f} s ({cause}{where})",
            event="deferral",
            job_id=job_id,
            service=service,
            agent=agent,
            cause=cause,
            wait_s=round(wait, 3),
            parked=parked,
        )


def limited(service: str, granted: bool, ahead: bool) -> None:
    """The limiter's decision: a slot ``granted`` (now, or kept ``ahead`` for a deferred run)."""
    if granted:
        metrics.limiter_slot(service, ahead)


def paused(service: str, scope: str | None) -> None:
    metrics.paused(service, scope)
