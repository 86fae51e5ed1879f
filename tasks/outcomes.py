"""Recording an attempt's outcome from a worker: into the ledger (or kept aside in the spool while
the ledger is away, so a called upstream is never called again by the sweeper), with a settled
job's write-only params dropped; then fed to the state every worker shares (the service's
pauses, its breaker, the kind's rate-limit costs).
"""

from __future__ import annotations

from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_task_logger
from sqlalchemy.exc import SQLAlchemyError

from integrations import breaker, coordination
from integrations.errors import CallError, RateLimited, TransientError
from integrations.ledger import jobs as ledger
from integrations.ledger import service_health, spool, sweeps
from integrations.ledger.db import unreachable
from integrations.ledger.models import TERMINAL
from integrations.observability import journal, traces
from integrations.services import Outcome, Service, get_services
from integrations.services.params import drop_write_only
from integrations.ssrf import BlockedAddress

log = get_task_logger(__name__)


@traces.spanned("job.record")
def record(claim: ledger.Claim, **fields: Any) -> None:
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


def observe(svc: Service, out: Outcome | None, err: CallError | None, claim: ledger.Claim) -> None:
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
