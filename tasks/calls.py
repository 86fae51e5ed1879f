"""Service calls: ``call_service`` accepts a job; one task per service runs it by id.

The per-service tasks (``integrations.call.<service>``) carry the service's retry policy as
Celery's own options (``autoretry_for``, ``retry_backoff``, ``retry_backoff_max``,
``retry_jitter``, ``max_retries``) and its rate limit as a task annotation, so every policy
is data on a task and Celery does the retrying.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.result import AsyncResult
from celery.utils.log import get_task_logger

from integrations import breaker, coordination, http, jobs
from integrations.config import ServiceConfig, get_services, get_settings
from integrations.errors import CallError, PermanentError, RateLimited, TransientError
from integrations.ledger import jobs as ledger
from integrations.ledger.models import JobStatus, utcnow
from tasks.celeryapp import app
from tasks.celeryapp import call_task_name as task_name

log = get_task_logger(__name__)


def publish(service: str, job_id: str, agent: str | None = None) -> None:
    """Put job ``job_id`` on the broker for ``service``'s task.

    The message carries the job id (and the agent, for its rate limit) only: parameters and
    secrets stay in the ledger.
    """
    kwargs = {"agent": agent} if agent else {}
    app.tasks[task_name(service)].apply_async((job_id,), kwargs, task_id=job_id)


class CallService(Task):  # type: ignore[misc]
    """``call_service.delay(service, operation, params, idempotency_key=None, agent=None)``.

    Validates in the caller (unknown service, operation or params raise and nothing is written
    or queued), writes the job row, then publishes its id to the service's task. The returned
    ``AsyncResult`` has the job id as its id; ``.get()`` gives ``{job_id, status, status_code,
    data, ...}`` or raises the job's final error. A reused idempotency key returns the existing
    job's result and calls nothing upstream. ``agent`` names the submitter, for per-agent rate
    limits and the ledger.
    """

    name = "integrations.call_service"
    typing = False

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> AsyncResult:
        service, operation, params, key, agent = _call_args(*(args or ()), **(kwargs or {}))
        job_id, _ = jobs.enqueue(service, operation, params, key, publish, agent=agent)
        return self.AsyncResult(job_id)

    def run(
        self,
        service: str,
        operation: str,
        params: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        agent: str | None = None,
    ) -> Any:
        """Called in-process (``call_service(...)``): accept the job and run it here."""
        job_id, _ = jobs.enqueue(
            service, operation, params, idempotency_key, lambda s, j, a: None, agent=agent
        )
        return app.tasks[task_name(service)].apply((job_id,), task_id=job_id).get()


def _call_args(
    service: str,
    operation: str,
    params: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    agent: str | None = None,
) -> tuple[str, str, dict[str, Any] | None, str | None, str | None]:
    return service, operation, params, idempotency_key, agent


call_service: CallService = app.register_task(CallService())


#: Celery puts ``repr(result)`` cut to this length in its log and in the task-succeeded event
#: that Flower shows. Cut after the status code, so upstream data never gets there.
_RESULT_REPR_MAX = len(repr({"job_id": "0" * 36, "status": "succeeded", "status_code": 200}))


def run_job(self: Task, job_id: str, slot: int | None = None, agent: str | None = None) -> dict[str, Any]:
    """Run one attempt of job ``job_id``; record it; succeed, retry or fail.

    Before the claim, the service's breaker and its global rate limits may defer the job: that
    charges no attempt. ``slot`` is a rate-limit slot already kept for this run (Redis clock,
    microseconds); ``agent`` picks the agent's own limit.
    """
    svc = get_services()[self.service_name]
    _gate(self, svc, job_id, slot, agent)
    if slot is not None and isinstance(self.request.kwargs, dict):
        # The slot is used by this run; a retry (Celery re-sends these kwargs) takes a new one.
        self.request.kwargs.pop("slot", None)
    claim = ledger.claim(job_id)
    if claim is None:
        # Already running elsewhere, or finished: a redelivered message. Store no result, so
        # the job's real result is not overwritten.
        log.info("job %s is not queued; duplicate delivery ignored", job_id)
        raise Ignore()
    started = utcnow()
    excerpt_max = get_settings().ledger_body_max_bytes
    try:
        resp = jobs.perform(claim)
    except SoftTimeLimitExceeded as e:
        err: CallError = TransientError("the call ran past the task's time limit")
        err.__cause__ = e
    except CallError as e:
        err = e
    except Exception as e:
        ledger.record_attempt(
            claim,
            status=JobStatus.FAILED,
            started_at=started,
            status_code=None,
            latency_ms=None,
            error=f"internal error ({type(e).__name__})",
            response_excerpt=None,
        )
        raise
    else:
        ledger.record_attempt(
            claim,
            status=JobStatus.SUCCEEDED,
            started_at=started,
            status_code=resp.status_code,
            latency_ms=resp.latency_ms,
            error=None,
            response_excerpt=resp.excerpt(excerpt_max),
        )
        _observe(svc, resp, None)
        # Key order matters: see _RESULT_REPR_MAX.
        return {
            "job_id": job_id,
            "status": JobStatus.SUCCEEDED.value,
            "status_code": resp.status_code,
            "attempts": claim.attempt,
            "latency_ms": round(resp.latency_ms, 3),
            "service": claim.service,
            "operation": claim.operation,
            "data": resp.data(),
        }

    resp = err.response
    will_retry = err.retryable and self.request.retries < self.max_retries
    wait = err.retry_after if isinstance(err, RateLimited) else None
    ledger.record_attempt(
        claim,
        status=JobStatus.RETRYING if will_retry else JobStatus.FAILED,
        started_at=started,
        status_code=err.status_code,
        latency_ms=resp.latency_ms if resp is not None else None,
        error=str(err),
        response_excerpt=resp.excerpt(excerpt_max) if resp is not None else None,
        next_attempt_at=started + dt.timedelta(seconds=wait) if will_retry and wait is not None else None,
    )
    _observe(svc, resp, err)
    if will_retry and wait is not None:
        # Honour the server's Retry-After instead of our own backoff.
        raise self.retry(exc=err, countdown=wait)
    raise err  # autoretry_for retries TransientError with the service's backoff; others fail


def _gate(task: Task, svc: ServiceConfig, job_id: str, slot: int | None, agent: str | None) -> None:
    """Defer the job (raising Ignore) while the breaker is open, the service is paused, or
    the global rate limits have no slot for it now."""
    gate = breaker.allow(svc)
    if gate.transition:
        ledger.record_breaker_event(svc.name, gate.transition, "reset timeout passed: one probe call")
    if gate.wait > 0:
        _defer(task, job_id, gate.wait, None, agent)
    if slot is not None:
        decision = coordination.on_time(svc, slot, agent)
    else:
        decision = coordination.acquire(svc, get_settings().defer_countdown_max, agent)
    if decision.wait > 0:
        _defer(task, job_id, decision.wait, decision.slot, agent)


def _defer(task: Task, job_id: str, wait: float, slot: int | None, agent: str | None) -> None:
    """Run the job again in ``wait`` seconds without charging an attempt: a broker countdown
    when short, else parked in the ledger for beat's dispatcher (a long countdown on Redis
    would outlive the visibility timeout and be delivered twice). ``slot``: the rate-limit slot
    kept for that run."""
    settings = get_settings()
    if wait <= settings.defer_countdown_max:
        kwargs: dict[str, Any] = {}
        if slot is not None:
            kwargs["slot"] = slot
        if agent:
            kwargs["agent"] = agent
        task.apply_async((job_id,), kwargs, countdown=wait, task_id=job_id, retries=task.request.retries)
    else:
        ledger.park(job_id, utcnow() + dt.timedelta(seconds=wait))
    raise Ignore()


def _observe(svc: ServiceConfig, resp: Any, err: CallError | None) -> None:
    """Feed a call's outcome to the shared state: pauses for every worker and the breaker.

    Runs after the outcome is in the ledger; a Redis that is away costs the pause or the
    breaker count, never the outcome."""
    try:
        _feed(svc, resp, err)
    except redis.RedisError as e:
        log.warning("shared state unreachable (%s); %s outcome not counted", type(e).__name__, svc.name)


def _feed(svc: ServiceConfig, resp: Any, err: CallError | None) -> None:
    pause = err.retry_after if isinstance(err, RateLimited) else None
    if resp is not None:
        spent = http.budget_spent_for(resp)
        if spent is not None:
            pause = max(pause or 0.0, min(spent, svc.retry.retry_after_max))
    if pause:
        coordination.pause(svc.name, pause)
    if isinstance(err, (RateLimited, http.BlockedAddress)):
        return  # says nothing of the upstream's health
    failed = isinstance(err, TransientError)
    transition = breaker.record(svc, ok=not failed)
    if transition == "closed":
        ledger.record_breaker_event(svc.name, "closed", "a call succeeded")
        ledger.release_deferred(svc.name)
    elif transition == "open":
        ledger.record_breaker_event(svc.name, "open", f"call failed: {err}")


def register_service_task(svc: ServiceConfig) -> Task:
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


for _svc in get_services().values():
    register_service_task(_svc)
