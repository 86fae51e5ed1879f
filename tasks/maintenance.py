"""Housekeeping run by beat."""

from __future__ import annotations

import datetime as dt

from celery.utils.log import get_task_logger

from integrations.config import get_settings
from integrations.ledger import jobs as ledger
from integrations.ledger.models import utcnow
from tasks.celeryapp import app, call_task_name

log = get_task_logger(__name__)


@app.task(name="integrations.requeue_stuck_jobs", ignore_result=True)
def requeue_stuck_jobs() -> int:
    """Publish again the jobs whose message was lost (worker killed, broker emptied).

    A job is presumed lost when it sat queued for ``STUCK_AFTER`` seconds, or ran or waited for
    a retry untouched for longer than the task time limit plus the longest countdown. The claim
    in the worker makes a spare message harmless.
    """
    s = get_settings()
    now = utcnow()
    found = ledger.stuck_jobs(
        now,
        queued_before=now - dt.timedelta(seconds=s.stuck_after),
        running_before=now - dt.timedelta(seconds=s.task_time_limit + s.max_countdown + 60),
    )
    for job_id, service in found:
        if call_task_name(service) in app.tasks:
            app.tasks[call_task_name(service)].apply_async((job_id,), task_id=job_id)
    if found:
        log.warning("re-queued %d stuck jobs", len(found))
    return len(found)


@app.task(name="integrations.dispatch_deferred", ignore_result=True)
def dispatch_deferred() -> int:
    """Queue again the jobs parked in the ledger (long rate-limit waits) whose time has come."""
    due = ledger.due_deferred(utcnow())
    for job_id, service in due:
        if call_task_name(service) in app.tasks:
            app.tasks[call_task_name(service)].apply_async((job_id,), task_id=job_id)
    return len(due)
