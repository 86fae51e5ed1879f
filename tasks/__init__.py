"""The Celery app (``celery -A tasks worker``) and its tasks, one module per kind of work.

Agents submit with ``call_service.delay(service, operation, params, idempotency_key=...,
agent=...)``; ``replay(job_id)`` submits a failed job again; ``publish_webhook.delay(type,
data)`` (or ``publish_now``) sends an event to the subscribed endpoints.
"""

from tasks.calls import call_service, replay
from tasks.celeryapp import app
from tasks.events import dispatch_event, requeue_stuck_events, run_handler
from tasks.inbox import poll_mailbox
from tasks.maintenance import dispatch_deferred, health_check, prune_ledger, requeue_stuck_jobs
from tasks.webhooks import deliver_webhook, dispatch_deliveries, publish_now, publish_webhook

__all__ = [
    "app",
    "call_service",
    "deliver_webhook",
    "dispatch_deferred",
    "dispatch_deliveries",
    "dispatch_event",
    "health_check",
    "poll_mailbox",
    "prune_ledger",
    "publish_now",
    "publish_webhook",
    "replay",
    "requeue_stuck_events",
    "requeue_stuck_jobs",
    "run_handler",
]
