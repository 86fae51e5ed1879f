"""Outgoing webhooks: fan an event out to the endpoints, and try each delivery when it is due.

Agents call ``publish_webhook.delay(event_type, data)``. The schedule of tries lives in the
ledger, not in broker countdowns: beat's ``dispatch_deliveries`` queues what is due.
"""

from __future__ import annotations

from typing import Any

from celery.utils.log import get_task_logger

from integrations.observability import metrics
from integrations.webhooks import outgoing
from tasks.celeryapp import app

log = get_task_logger(__name__)


@app.task(name="integrations.publish_webhook")
def publish_webhook(event_type: str, data: Any) -> list[str]:
    """Create one delivery per subscribed endpoint and try each at once; return their ids."""
    ids = outgoing.publish(event_type, data)
    for delivery_id in ids:
        deliver_webhook.delay(delivery_id)
    return ids


@app.task(name="integrations.deliver_webhook", ignore_result=True)
def deliver_webhook(delivery_id: str) -> str | None:
    status = outgoing.attempt(delivery_id)
    # None: not due, or taken by another worker; pending: failed, tried again later.
    metrics.delivery_tried("skipped" if status is None else "retrying" if status == "pending" else status)
    return status


@app.task(name="integrations.dispatch_deliveries", ignore_result=True)
def dispatch_deliveries() -> int:
    due = outgoing.due_now()
    for delivery_id in due:
        deliver_webhook.delay(delivery_id)
    if due:
        log.info("queued %d deliveries due for a try", len(due))
    return len(due)


def publish_now(event_type: str, data: Any) -> list[str]:
    """Deliver an event to every endpoint subscribed to ``event_type``; return the delivery ids.

    The deliveries are stored before this returns and tried at once by the workers, then on
    the retry schedule; the same as ``publish_webhook.delay(event_type, data)``, minus the wait
    for a worker to create them.
    """
    ids = outgoing.publish(event_type, data)
    for delivery_id in ids:
        deliver_webhook.delay(delivery_id)
    return ids
