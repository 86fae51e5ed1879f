"""The Celery app (``celery -A tasks worker``) and its tasks, one module per kind of work."""

from tasks.calls import call_service
from tasks.celeryapp import app
from tasks.events import dispatch_event, requeue_stuck_events, run_handler
from tasks.inbox import poll_mailbox
from tasks.maintenance import dispatch_deferred, health_check, requeue_stuck_jobs
from tasks.webhooks import deliver_webhook, dispatch_deliveries, publish_webhook

__all__ = [
    "app",
    "call_service",
    "deliver_webhook",
    "dispatch_deferred",
    "dispatch_deliveries",
    "dispatch_event",
    "health_check",
    "poll_mailbox",
    "publish_webhook",
    "requeue_stuck_events",
    "requeue_stuck_jobs",
    "run_handler",
]
