"""One attempt of a job in a worker: ``run_job``, the body of every per-service task (see
:mod:`tasks.calls`). It checks the gates before the claim (the service's breaker, pause and
global rate limits) and after it (the kind's own limits for these params), defers the job
without charging an attempt when a gate has no room (a broker countdown, or parked in the
ledger), claims the job, makes the call, and hands the outcome to :mod:`tasks.outcomes`.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.utils.log import get_task_logger
from sqlalchemy.exc import SQLAlchemyError

from integrations import breaker, coordination, jobs, redact
from integrations.config import get_settings
from integrations.errors import CallError, PermanentError, RateLimited, TransientError
from integrations.ledger import jobs as ledger
from integrations.ledger import service_health, spool, sweeps
from integrations.ledger.db import unreachable
from integrations.ledger.models import JobStatus, utcnow
from integrations.observability import journal, traces
from integrations.services import Service, get_services
from tasks import liveness
from tasks.celeryapp import delay_options
from tasks.outcomes import observe, record

log = get_task_logger(__name__)


def run_job(
    self: Task, job_id: str, slot: int | None = None, agent: str | None = None, scope_slot: int | None = None
) -> dict[str, Any]:
    """Run one attempt of job ``job_id``; record it; succeed, retry or fail.

    Before the claim, the service's breaker and its global rate limits may defer the job: that
    charges no attempt. After it, the limits of the kind's own (per method, channel, tokens:
    they depend on the params, which only the ledger holds) may defer it too, giving the claim
    back. ``slot`` and ``scope_slot`` are rate-limit slots already kept for this run (Redis
    clock, microseconds); ``agent`` picks the agent's own limit.
    """
    svc = get_services()[self.service_name]
    granted = _gate(self, svc, job_id, slot, agent)
    if isinstance(self.request.kwargs, dict):
        # The slots are used by this run; a retry (Celery re-sends these kwargs) takes new ones.
        self.request.kwargs.pop("slot", None)
        self.request.kwargs.pop("scope_slot", None)
    try:
        claim = _claim(job_id, liveness.node())
    except (SoftTimeLimitExceeded, SQLAlchemyError) as e:
        if isinstance(e, SQLAlchemyError) and not unreachable(e):
            raise
        # The ledger is away: nothing was claimed or called. Come back later rather than let
        # Celery store a failure the agent would take for the job's.
        log.warning("ledger away (%s): job %s deferred before its claim", type(e).__name__, job_id)
        _defer(self, job_id, get_settings().defer_countdown_max, None, agent, cause="ledger")
    if claim is None and spool.flush(job_id):
        # Its last outcome was kept aside while the ledger was away; recorded now, try again.
        claim = _claim(job_id, liveness.node())
    if claim is None:
        # Already running elsewhere, or finished: a redelivered message. Store no result, so
        # the job's real result is not overwritten.
        log.info("job %s is not queued; duplicate delivery ignored", job_id)
        raise Ignore()
    _gate_claimed(self, svc, claim, granted, agent, scope_slot)
    started = utcnow()
    try:
        with traces.span("job.attempt", **{"job.id": job_id, "job.attempt": claim.attempt}):
            out = jobs.perform(svc, claim, agent)
    except SoftTimeLimitExceeded:
        err: CallError = TransientError("the call ran past the task's time limit")
    except CallError as e:
        err = e
    except Exception as e:
        record(
            claim,
            status=JobStatus.FAILED,
            started_at=started,
            status_code=None,
            latency_ms=None,
            error=f"internal error ({type(e).__name__})",
            response_excerpt=None,
        )
        journal.attempted(claim, agent, JobStatus.FAILED, None, None, e)
        log.error("job %s: internal error", job_id, exc_info=True)
        # Not chained: the cause's text may hold a request's URL.
        raise PermanentError(f"internal error ({type(e).__name__})") from None
    else:
        record(
            claim,
            status=JobStatus.SUCCEEDED,
            started_at=started,
            status_code=out.status_code,
            latency_ms=out.latency_ms,
            error=None,
            response_excerpt=out.excerpt,
            meta=out.meta,
            input_tokens=out.usage.input_tokens if out.usage else None,
            output_tokens=out.usage.output_tokens if out.usage else None,
        )
        tokens = (out.usage.input_tokens, out.usage.output_tokens) if out.usage else (None, None)
        journal.attempted(claim, agent, JobStatus.SUCCEEDED, out.status_code, out.latency_ms, None, tokens)
        observe(svc, out, None, claim)
        # Key order matters: see tasks.calls._RESULT_REPR_MAX.
        return {
            "job_id": job_id,
            "status": JobStatus.SUCCEEDED.value,
            "status_code": out.status_code,
            "attempts": claim.attempt,
            "latency_ms": round(out.latency_ms, 3) if out.latency_ms is not None else None,
            "service": claim.service,
            "operation": claim.operation,
            **({"meta": out.meta} if out.meta else {}),
            **({"usage": vars(out.usage)} if out.usage else {}),
            "data": out.data,
        }

    # Whatever an upstream put in the message (a reason phrase, a server's text) is masked
    # before it is stored, sent to Celery or shown.
    if (masked := redact.redact(str(err))) != str(err):
        err.args = (masked,)
    will_retry = err.retryable and self.request.retries < self.max_retries
    wait = err.retry_after if isinstance(err, RateLimited) else None
    status = JobStatus.RETRYING if will_retry else JobStatus.FAILED
    record(
        claim,
        status=status,
        started_at=started,
        status_code=err.status_code,
        latency_ms=err.latency_ms,
        error=str(err),
        response_excerpt=err.excerpt,
        next_attempt_at=started + dt.timedelta(seconds=wait) if will_retry and wait is not None else None,
        meta=err.meta,
    )
    journal.attempted(claim, agent, status, err.status_code, err.latency_ms, err, retry_in=wait)
    observe(svc, None, err, claim)
    # Celery stores and emits the exception with its traceback (result backend, task events):
    # our message is clean, but a chained cause (urllib3's, with the URL) may not be.
    err.__cause__, err.__context__, err.__suppress_context__ = None, None, True
    if will_retry and wait is not None:
        # Honour the server's Retry-After instead of our own backoff.
        raise self.retry(exc=err, **delay_options(wait))
    raise err  # autoretry_for retries TransientError with the service's backoff; others fail


_claim = traces.spanned("job.claim")(ledger.claim)


@traces.spanned("job.limiter")
def _gate(task: Task, svc: Service, job_id: str, slot: int | None, agent: str | None) -> float | None:
    """Defer the job (raising Ignore) while the breaker is open, the service is paused, or
    the global rate limits have no slot for it now. Returns when (``time.monotonic()``) a
    rate-limit slot was granted, ``None`` when the service has no limit."""
    gate = breaker.allow(svc)
    if gate.transition:
        service_health.record_breaker_event(svc.name, gate.transition, "reset timeout passed: one probe call")
    if gate.wait > 0:
        _defer(task, job_id, gate.wait, None, agent, cause="breaker")
    if slot is not None:
        decision = coordination.on_time(svc, slot, agent)
    else:
        decision = coordination.acquire(svc, get_settings().defer_countdown_max, agent)
    journal.limited(svc.name, decision.limited, decision.wait > 0)
    if decision.wait > 0:
        _defer(task, job_id, decision.wait, decision.slot, agent, cause=_cause(decision))
    return time.monotonic() if decision.limited else None


def _gate_claimed(
    task: Task,
    svc: Service,
    claim: ledger.Claim,
    granted: float | None,
    agent: str | None,
    scope_slot: int | None,
) -> None:
    """The limits checked once the job is claimed: the kind's own scopes for these params, and
    the service's again when its grant went stale before the call (a cold worker, a slow claim:
    what the upstream counts is when the call arrives). No slot now: the claim is given back
    (no attempt counted) and the job deferred."""
    op = svc.operation(claim.operation)
    scopes = svc.scopes(op, claim.params) if op is not None else []
    scopes = [*scopes, *svc.connection_scopes(claim.connection)]
    stale = granted is not None and time.monotonic() - granted > get_settings().rate_limit_margin
    if not scopes and not stale:
        return
    if scope_slot is not None and not stale:
        decision = coordination.on_time(svc, scope_slot, agent, scopes, include_service=False)
    else:
        reserve = get_settings().defer_countdown_max
        decision = coordination.acquire(svc, reserve, agent, scopes, include_service=stale)
    journal.limited(svc.name, decision.limited, decision.wait > 0)
    if decision.wait > 0:
        if not ledger.release(claim):
            raise Ignore()  # the claim is no longer this run's to give back or to use
        _defer(
            task, claim.job_id, decision.wait, None, agent, scope_slot=decision.slot, cause=_cause(decision)
        )


def _cause(decision: coordination.Decision) -> str:
    return "pause" if decision.paused else "limit"


def _defer(
    task: Task,
    job_id: str,
    wait: float,
    slot: int | None,
    agent: str | None,
    scope_slot: int | None = None,
    *,
    cause: str,
) -> None:
    """Run the job again in ``wait`` seconds without charging an attempt: a broker countdown
    when short, else parked in the ledger for beat's dispatcher (a long countdown on Redis
    would outlive the visibility timeout and be delivered twice). ``slot``: the rate-limit slot
    kept for that run. ``cause`` (limit, pause, breaker, ledger) goes to the logs and metrics."""
    settings = get_settings()
    journal.deferred(task.service_name, job_id, agent, wait, cause, wait > settings.defer_countdown_max)
    if wait <= settings.defer_countdown_max:
        kwargs: dict[str, Any] = {}
        if slot is not None:
            kwargs["slot"] = slot
        if scope_slot is not None:
            kwargs["scope_slot"] = scope_slot
        if agent:
            kwargs["agent"] = agent
        task.apply_async(
            (job_id,), kwargs, task_id=job_id, retries=task.request.retries, **delay_options(wait)
        )
    else:
        sweeps.park(job_id, utcnow() + dt.timedelta(seconds=wait))
    raise Ignore()
