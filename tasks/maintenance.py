"""What beat runs: the stuck-job sweeper, the deferred-job dispatcher, health checks and the
ledger's pruning."""

from __future__ import annotations

import datetime as dt

from celery.utils.log import get_task_logger

from integrations import breaker, coordination, health, redact
from integrations.config import get_settings
from integrations.ledger import jobs as ledger
from integrations.ledger import retention, spool
from integrations.ledger.models import utcnow
from integrations.services import get_services
from tasks.calls import publish
from tasks.celeryapp import app

log = get_task_logger(__name__)


@app.task(name="integrations.requeue_stuck_jobs", ignore_result=True)
def requeue_stuck_jobs() -> int:
    """Publish again the jobs whose message was lost (worker killed, broker emptied).

    A job is presumed lost when it sat queued for ``STUCK_AFTER`` seconds, ran past the task's
    hard time limit (no worker can still be at it), or waited for a retry past the longest
    countdown. The claim in the worker makes a spare message harmless.
    """
    # Outcomes kept aside while the ledger was away first: their jobs are not stuck.
    spool.flush()
    s = get_settings()
    now = utcnow()

    def before(seconds: float) -> dt.datetime:
        return now - dt.timedelta(seconds=max(s.stuck_after, seconds))

    found = ledger.stuck_jobs(
        now,
        queued_before=before(0),
        running_before=before(s.task_time_limit + 10),
        retrying_before=before(max(s.max_countdown, s.defer_countdown_max) + 10),
    )
    services = get_services()
    for job_id, service, agent in found:
        if service in services:
            publish(service, job_id, agent)
    if found:
        log.warning("re-queued %d stuck jobs", len(found))
    return len(found)


@app.task(name="integrations.dispatch_deferred", ignore_result=True)
def dispatch_deferred() -> int:
    """Queue again the jobs parked in the ledger (long rate-limit waits) whose time has come."""
    due = ledger.due_deferred(utcnow())
    services = get_services()
    for job_id, service, agent in due:
        if service in services:
            publish(service, job_id, agent)
    return len(due)


@app.task(name="integrations.health_check", ignore_result=True)
def health_check(service: str) -> bool | None:
    """Check ``service`` once and record it. A healthy check closes an open breaker early.

    Skipped (``None``) while the upstream asked us to wait, or when the global rate limit has
    no slot now: a check must not spend the budget the jobs need.
    """
    svc = get_services().get(service)
    if svc is None or svc.health is None or not svc.health.enabled:
        return None
    if coordination.acquire(svc).wait > 0:
        log.info("health check of %s skipped: the service is paused or at its rate limit", service)
        return None
    out = health.check(svc)
    error = redact.redact(out.error) if out.error else None
    ledger.record_health(service, out.ok, out.status_code, out.latency_ms, error)
    if out.ok and breaker.state(service) != "closed":
        breaker.reset(service)
        ledger.record_breaker_event(service, "closed", "health check passed")
        ledger.release_deferred(service)
    return out.ok


@app.task(name="integrations.prune_ledger", ignore_result=True)
def prune_ledger(keep_seconds: float) -> int:
    """Delete what finished more than ``keep_seconds`` ago (``LEDGER_RETENTION``), in small
    batches. Stops starting batches at half the task's soft time limit: the next run, an hour
    later, goes on where this one stopped."""
    done = retention.prune(
        dt.timedelta(seconds=keep_seconds), time_limit=get_settings().task_soft_time_limit / 2
    )
    deleted = sum(done.counts.values())
    if deleted:
        log.info(
            "pruned the ledger: %s%s",
            ", ".join(f"{n} {name}" for name, n in done.counts.items() if n),
            "" if done.complete else " (more next time)",
        )
    return deleted
