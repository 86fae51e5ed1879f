"""What beat runs: the stuck-job sweeper, the deferred-job dispatcher, health checks and the
ledger's pruning."""

from __future__ import annotations

import datetime as dt

import redis
from celery.utils.log import get_task_logger

from integrations import breaker, coordination, health, liveness, redact
from integrations.config import get_settings
from integrations.ledger import retention, service_health, spool, sweeps
from integrations.ledger.models import utcnow
from integrations.services import get_services
from tasks.calls import republish
from tasks.celeryapp import app

log = get_task_logger(__name__)


@app.task(name="integrations.requeue_stuck_jobs", ignore_result=True)
def requeue_stuck_jobs() -> int:
    """Publish again the jobs whose message was lost (worker killed, broker emptied).

    The jobs of a lost worker node (no heartbeat for ``NODE_LOST_AFTER``) come back first: the
    ones it had received and not claimed, and the ones it was running once their attempt's own
    time (the service's timeout) is up. Without word of a lost node, a job is presumed lost
    when it sat queued for ``STUCK_AFTER`` seconds, ran for ``STUCK_AFTER`` and past the task's
    hard time limit (no worker can still be at it), or waited for a retry for ``STUCK_AFTER``
    and past the longest countdown. The claim in the worker makes a spare message harmless.
    """
    # Outcomes kept aside while the ledger was away first: their jobs are not stuck.
    spool.flush()
    s = get_settings()
    now = utcnow()

    def before(seconds: float) -> dt.datetime:
        return now - dt.timedelta(seconds=max(s.stuck_after, seconds))

    lost_nodes, of_lost = _jobs_of_lost_nodes(now)
    found = of_lost + sweeps.stuck_jobs(
        now,
        # A deferred job sits queued for up to DEFER_COUNTDOWN_MAX (its countdown): not lost.
        queued_before=before(s.defer_countdown_max + 10),
        running_before=before(s.task_time_limit + 10),
        retrying_before=before(max(s.max_countdown, s.defer_countdown_max) + 10),
    )
    services = get_services()
    for job_id, service, agent in found:
        if service in services:
            republish(service, job_id, agent)
    # Their jobs are back on the broker: forget the nodes (one still named by a running job
    # whose attempt has time left is found again through the ledger next time).
    liveness.forget(lost_nodes)
    if lost_nodes:
        log.warning(
            "worker nodes lost: %s; %d of their jobs re-queued", ", ".join(sorted(lost_nodes)), len(of_lost)
        )
    if len(found) > len(of_lost):
        log.info("re-queued %d stuck jobs", len(found) - len(of_lost))
    return len(found)


def attempt_time(service: str) -> float:
    """How long after its claim an attempt at one of ``service``'s jobs may still be waiting for
    the upstream: the service's timeout (a few seconds' margin), never past the task's hard
    time limit."""
    s = get_settings()
    svc = get_services().get(service)
    bound = s.task_time_limit + 10 if svc is None else min(svc.timeout + 5, s.task_time_limit + 10)
    return float(bound)


def _jobs_of_lost_nodes(now: dt.datetime) -> tuple[set[str], list[tuple[str, str, str | None]]]:
    """The worker nodes found lost, and their jobs reset for a new message."""
    try:
        lost = liveness.lost(sweeps.running_nodes())
        held = {job_id for node in lost for job_id in liveness.held(node)}
    except redis.RedisError as e:
        log.warning("worker liveness unknown (%s): only STUCK_AFTER applies this time", type(e).__name__)
        return set(), []
    if not lost:
        return set(), []
    return lost, sweeps.jobs_of_lost_nodes(now, lost, held, attempt_time)


@app.task(name="integrations.dispatch_deferred", ignore_result=True)
def dispatch_deferred() -> int:
    """Queue again the jobs parked in the ledger (long rate-limit waits) whose time has come."""
    due = sweeps.due_deferred(utcnow())
    services = get_services()
    for job_id, service, agent in due:
        if service in services:
            republish(service, job_id, agent)
    if due:
        log.info("queued %d deferred jobs whose time has come", len(due))
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
    service_health.record_health(service, out.ok, out.status_code, out.latency_ms, error)
    if out.ok and breaker.state(service) != "closed":
        breaker.reset(service)
        service_health.record_breaker_event(service, "closed", "health check passed")
        sweeps.release_deferred(service)
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
