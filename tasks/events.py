"""Incoming events: hand a stored event to its handlers, one task per handler.

``dispatch_event(event_id)`` records one handling per matching handler and queues
``run_handler(handling_id)`` for each; a failing handler is retried on its own with Celery's
autoretry (exponential backoff, full jitter) and the others are not touched.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any

from celery import Task
from celery.signals import worker_init
from celery.utils.log import get_task_logger

from integrations import events
from integrations.auth import tokens
from integrations.config import get_settings
from integrations.ledger import events as ledger
from integrations.ledger.models import HandlingStatus, utcnow
from integrations.observability import traces
from tasks.celeryapp import app

log = get_task_logger(__name__)

#: Handlers are the agents' code: any exception they raise is a failure to retry.
RETRY_BACKOFF_MAX = 600


@functools.cache
def load_handlers() -> None:
    """Import the modules of ``EVENT_HANDLERS`` once per process (a worker does it at start)."""
    events.load_handlers(get_settings().handler_modules)


@worker_init.connect
def _load_handlers_at_start(**_: Any) -> None:
    load_handlers()


def publish_event(event_id: str) -> None:
    """Queue a stored event for dispatch (the receiver, the inbox poller and connections call this)."""
    dispatch_event.delay(event_id)


# A connection's events (connection:needs_reauth, connection:authorized) go to the handlers too.
tokens.set_event_publisher(publish_event)


def publish_events(event_ids: list[str]) -> None:
    """Queue the events of one write of the receiver for dispatch, in one message."""
    if len(event_ids) == 1:
        dispatch_event.delay(event_ids[0])
    else:
        dispatch_events.delay(event_ids)


class HandlerTask(Task):  # type: ignore[misc]
    """The retry policy of handlers, read from the settings when the task is made (at the
    app's finalization, not at import)."""

    autoretry_for = (Exception,)
    retry_backoff_max = RETRY_BACKOFF_MAX
    retry_jitter = True

    @property
    def max_retries(self) -> int:
        return get_settings().handler_max_retries

    @property
    def retry_backoff(self) -> int:
        return get_settings().handler_retry_backoff


@app.task(name="integrations.dispatch_event", ignore_result=True)
def dispatch_event(event_id: str) -> int:
    return _dispatch(event_id)


@app.task(name="integrations.dispatch_events", ignore_result=True)
def dispatch_events(event_ids: list[str]) -> int:
    """:func:`dispatch_event` for each; run again after a lost worker, none is handled twice
    (the handlings are recorded once per event and handler)."""
    return sum(_dispatch(event_id) for event_id in event_ids)


def _dispatch(event_id: str) -> int:
    load_handlers()
    event = ledger.get_event(event_id)
    if event is None:
        return 0
    names = events.handlers_for(event.source, event.type)
    pending = ledger.start_dispatch(event_id, names)
    for handling_id in pending:
        run_handler.delay(handling_id)
    return len(pending)


@app.task(bind=True, base=HandlerTask, name="integrations.run_handler", ignore_result=True)
def run_handler(self, handling_id: int) -> None:  # type: ignore[no-untyped-def]
    load_handlers()
    claim = ledger.claim_handling(handling_id)
    if claim is None:
        return
    fn = events.get_handler(claim.handler)
    if fn is None:
        ledger.finish_handling(handling_id, HandlingStatus.FAILED, "handler is not registered in this worker")
        return
    try:
        with traces.span("event.handler", **{"event.handler": claim.handler, "event.id": claim.event.id}):
            fn(claim.event)
    except Exception as e:
        # Counted in the ledger, not by Celery: a handling re-queued by the sweeper starts
        # Celery's count again, and must still stop after its tries.
        final = claim.attempt > self.max_retries
        error = f"{type(e).__name__}: {e}"[:1000]
        ledger.finish_handling(
            handling_id, HandlingStatus.FAILED if final else HandlingStatus.RETRYING, error
        )
        log.warning("handler %s failed on event %s: %s", claim.handler, claim.event.id, type(e).__name__)
        if final:
            return
        raise
    ledger.finish_handling(handling_id, HandlingStatus.SUCCEEDED)


@app.task(name="integrations.requeue_stuck_events", ignore_result=True)
def requeue_stuck_events() -> int:
    """Queue again events never dispatched (receiver died between store and queue) and
    handlings whose message was lost; the claims make a spare message harmless."""
    s = get_settings()
    now = utcnow()

    def before(seconds: float) -> dt.datetime:
        return now - dt.timedelta(seconds=max(s.stuck_after, seconds))

    event_ids, handling_ids = ledger.stuck(
        undispatched_before=before(0),
        queued_before=before(0),
        running_before=before(s.task_time_limit + 10),
        retrying_before=before(RETRY_BACKOFF_MAX + 10),
    )
    for event_id in event_ids:
        dispatch_event.delay(event_id)
    for handling_id in handling_ids:
        run_handler.delay(handling_id)
    if event_ids or handling_ids:
        log.info("re-queued %d events and %d handlings", len(event_ids), len(handling_ids))
    return len(event_ids) + len(handling_ids)
