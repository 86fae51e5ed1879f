"""Service calls: ``call_service`` accepts a job; one task per service runs it by id.

The per-service tasks (``integrations.call.<service>``) carry the service's retry policy as
Celery's own options (``autoretry_for``, ``retry_backoff``, ``retry_backoff_max``,
``retry_jitter``, ``max_retries``) and its rate limit as a task annotation, so every policy
is data on a task and Celery does the retrying. They are registered when the app is finalized
(a worker starting), from the services file of that moment.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.result import AsyncResult
from celery.utils.log import get_task_logger
from sqlalchemy.exc import SQLAlchemyError

from integrations import breaker, coordination, jobs, redact
from integrations.config import get_settings
from integrations.errors import CallError, PermanentError, RateLimited, TransientError
from integrations.ledger import jobs as ledger
from integrations.ledger import reads, service_health, spool, sweeps
from integrations.ledger.db import unreachable
from integrations.ledger.models import TERMINAL, JobStatus, utcnow
from integrations.observability import journal, traces
from integrations.services import Outcome, Service, get_services
from integrations.services.params import drop_write_only
from integrations.ssrf import BlockedAddress
from tasks import liveness
from tasks.celeryapp import app, delay_options
from tasks.celeryapp import call_task_name as task_name

log = get_task_logger(__name__)


def publish(service: str, job_id: str, agent: str | None = None) -> None:
    """Put job ``job_id`` on the broker for ``service``'s task.

    The message carries the job id (and the agent, for its rate limit) only: parameters and
    secrets stay in the ledger. When tracing, its headers carry the current trace context.
    """
    kwargs = {"agent": agent} if agent else {}
    app.send_task(task_name(service), (job_id,), kwargs, task_id=job_id, headers=traces.carrier())


def republish(service: str, job_id: str, agent: str | None = None) -> None:
    """:func:`publish` for beat's dispatchers and sweepers: the job goes back into the trace it
    was submitted in (kept in its row), not into the dispatcher's."""
    if not traces.active():
        publish(service, job_id, agent)
        return
    with traces.resumed(reads.trace_contexts([job_id]).get(job_id)):
        publish(service, job_id, agent)


class CallService(Task):  # type: ignore[misc]
    """``call_service.delay(service, operation, params, idempotency_key=None, agent=None,
    connection=None)``.

    Validates in the caller (unknown service, operation or params raise and nothing is written
    or queued), writes the job row, then publishes its id to the service's task. The returned
    ``AsyncResult`` has the job id as its id; ``.get()`` gives ``{job_id, status, status_code,
    data, ...}`` or raises the job's final error. A reused idempotency key returns the existing
    job's result and calls nothing upstream. ``agent`` names the submitter, for per-agent rate
    limits and the ledger. ``connection`` names the end user the job acts for (a service with
    per-user auth sends that connection's token); it stays on the job row, off the broker.
    """

    typing = False

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> AsyncResult:
        service, operation, params, key, agent, connection = _call_args(*(args or ()), **(kwargs or {}))
        job_id, _ = jobs.enqueue(service, operation, params, key, publish, agent=agent, connection=connection)
        return self.AsyncResult(job_id)


def _call_args(
    service: str,
    operation: str,
    params: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    agent: str | None = None,
    connection: str | None = None,
) -> tuple[str, str, dict[str, Any] | None, str | None, str | None, str | None]:
    return service, operation, params, idempotency_key, agent, connection


@app.task(base=CallService, name="integrations.call_service")
def call_service(
    service: str,
    operation: str,
    params: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    agent: str | None = None,
    connection: str | None = None,
) -> Any:
    """Called in-process (``call_service(...)``): accept the job and run it here."""
    job_id, _ = jobs.enqueue(
        service, operation, params, idempotency_key, lambda s, j, a: None, agent=agent, connection=connection
    )
    return app.tasks[task_name(service)].apply((job_id,), task_id=job_id).get()


def replay(job_id: str) -> AsyncResult:
    """Submit failed job ``job_id`` again as a new job linked to it; return the new job's result."""
    return call_service.AsyncResult(jobs.replay(job_id, publish))


#: Celery puts ``repr(result)`` cut to this length in its log and in the task-succeeded event
#: that Flower shows. Cut after the status code, so upstream data never gets there.
_RESULT_REPR_MAX = len(repr({"job_id": "0" * 36, "status": "succeeded", "status_code": 200}))


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
        _record(
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
        _record(
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
        _observe(svc, out, None, claim)
        # Key order matters: see _RESULT_REPR_MAX.
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
    _record(
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
    _observe(svc, None, err, claim)
    # Celery stores and emits the exception with its traceback (result backend, task events):
    # our message is clean, but a chained cause (urllib3's, with the URL) may not be.
    err.__cause__, err.__context__, err.__suppress_context__ = None, None, True
    if will_retry and wait is not None:
        # Honour the server's Retry-After instead of our own backoff.
        raise self.retry(exc=err, **delay_options(wait))
    raise err  # autoretry_for retries TransientError with the service's backoff; others fail


_claim = traces.spanned("job.claim")(ledger.claim)


@traces.spanned("job.record")
def _record(claim: ledger.Claim, **fields: Any) -> None:
    """Record an attempt's outcome; if the ledger stays away past the task's time (the retried
    write is cut by the soft time limit) or past LEDGER_RETRY_FOR, keep it aside
    (:mod:`integrations.ledger.spool`) rather than lose it: the upstream was called, and a
    sweeper re-run would call it again."""
    try:
        ledger.record_attempt(claim, **fields)
        if fields["status"] in TERMINAL:
            _drop_content(claim)
    except (SoftTimeLimitExceeded, SQLAlchemyError) as e:
        if isinstance(e, SQLAlchemyError) and not unreachable(e):
            # A value the database will not store: record the outcome without it, never leave
            # the job running (the sweeper would call the upstream again).
            log.error("job %s: the ledger refused the outcome's details (%s)", claim.job_id, type(e).__name__)
            ledger.record_attempt(claim, **ledger.refused_fields(fields, e))
            return
        spool.put(claim, fields)
        log.warning(
            "ledger unreachable (%s): job %s's outcome kept aside until it is back",
            type(e).__name__,
            claim.job_id,
        )


def _drop_content(claim: ledger.Claim) -> None:
    """A settled job keeps what it was asked, not what it carried: params its operation marks
    ``writeOnly`` (a message's body, a file's content) become their digest."""
    svc = get_services().get(claim.service)
    op = svc.operation(claim.operation) if svc is not None else None
    if op is not None:
        params, dropped = drop_write_only(claim.params, op.parameters)
        if dropped:
            ledger.keep_params(claim.job_id, params)


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


def _observe(svc: Service, out: Outcome | None, err: CallError | None, claim: ledger.Claim) -> None:
    """Feed a call's outcome to the shared state: pauses for every worker and the breaker.

    Runs after the outcome is in the ledger; a Redis that is away costs the pause or the
    breaker count, never the outcome."""
    try:
        _feed(svc, out, err, claim)
    except (redis.RedisError, SoftTimeLimitExceeded) as e:
        log.warning("shared state not updated (%s); %s outcome not counted", type(e).__name__, svc.name)


def _feed(svc: Service, out: Outcome | None, err: CallError | None, claim: ledger.Claim) -> None:
    pause = out.pause if out is not None else err.pause if err is not None else None
    if pause:
        coordination.pause(svc.name, min(pause, svc.retry.retry_after_max), err.scope if err else None)
        journal.paused(svc.name, err.scope if err else None)
    op = svc.operation(claim.operation)
    if out is not None and op is not None:
        for scope, cost in svc.settle(op, claim.params, out):
            coordination.settle(svc, scope, cost)
    if isinstance(err, RateLimited | BlockedAddress):
        return  # says nothing of the upstream's health
    failed = isinstance(err, TransientError)
    transition = breaker.record(svc, ok=not failed)
    if transition == "closed":
        service_health.record_breaker_event(svc.name, "closed", "a call succeeded")
        sweeps.release_deferred(svc.name)
    elif transition == "open":
        service_health.record_breaker_event(svc.name, "open", f"call failed: {err}")


def register_service_task(svc: Service) -> Task:
    policy = svc.retry
    return app.task(
        run_job,
        service_name=svc.name,
        name=task_name(svc.name),
        bind=True,
        autoretry_for=(TransientError,),
        dont_autoretry_for=(PermanentError,),
        retry_backoff=policy.backoff,
        retry_backoff_max=policy.backoff_max,
        retry_jitter=policy.jitter,
        max_retries=policy.max_retries,
        # Expected outcomes: logged in one line, without a traceback.
        throws=(CallError,),
        resultrepr_maxsize=_RESULT_REPR_MAX,
        acks_late=True,
        reject_on_worker_lost=True,
    )


@app.on_after_finalize.connect
def _register_service_tasks(sender: Any, **_: Any) -> None:
    for svc in get_services().values():
        if task_name(svc.name) not in sender.tasks:
            register_service_task(svc)
