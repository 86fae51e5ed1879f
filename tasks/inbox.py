"""Inbox polling: beat runs ``poll_mailbox(name)`` for each enabled mailbox on its interval."""

from __future__ import annotations

from typing import Any

from celery.utils.log import get_task_logger

from integrations import inbox
from integrations.config import get_mailboxes
from integrations.observability import metrics
from tasks.celeryapp import app
from tasks.events import publish_event

log = get_task_logger(__name__)


@app.task(name="integrations.poll_mailbox", ignore_result=True)
def poll_mailbox(mailbox_name: str) -> dict[str, Any] | None:
    """Poll one mailbox, named as in the services file (the password never travels with the task).

    Not retried: a failed poll raises its typed error and leaves the cursor, and beat's next
    run starts from there. ``None`` when there is no such enabled mailbox.
    """
    box = get_mailboxes().get(mailbox_name)
    if box is None or not box.enabled:
        log.warning("no enabled mailbox named %s", mailbox_name)
        return None
    try:
        result = inbox.poll(box, publish_event)
    except Exception:
        metrics.mailbox_polled(mailbox_name, "error")
        raise
    metrics.mailbox_polled(
        mailbox_name, "skipped" if result.skipped else "ok", result.dispatched, result.duplicates
    )
    if result.dispatched or result.duplicates:
        log.info(
            "mailbox %s: %d new messages dispatched, %d already stored",
            mailbox_name,
            result.dispatched,
            result.duplicates,
        )
    if result.fetched == inbox.BATCH:
        log.info("mailbox %s: more messages wait for the next poll", mailbox_name)
    return {
        "skipped": result.skipped,
        "fetched": result.fetched,
        "dispatched": result.dispatched,
        "duplicates": result.duplicates,
    }
