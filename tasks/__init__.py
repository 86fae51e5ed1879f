"""The Celery app (``celery -A tasks worker``) and its tasks, one module per kind of work.

Agents submit with ``call_service.delay(service, operation, params, idempotency_key=...,
agent=...)``; ``replay(job_id)`` submits a failed job again; ``publish_webhook.delay(type,
data)`` (or ``publish_now``) sends an event to the subscribed endpoints.

The modules load at the first use of any of these names (``celery -A tasks`` asks for
``app``), all of them, as an import of the package used to; the ``integrations`` command
(``tasks.cli``) starts without them, so its reading commands answer sooner (measured: the
app and every kind took 0.7 to 0.9 s of `integrations stats` on a busy 2-core machine).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.calls import call_service, replay
    from tasks.celeryapp import app
    from tasks.events import dispatch_event, requeue_stuck_events, run_handler
    from tasks.inbox import poll_mailbox
    from tasks.maintenance import dispatch_deferred, health_check, prune_ledger, requeue_stuck_jobs
    from tasks.webhooks import deliver_webhook, dispatch_deliveries, publish_now, publish_webhook

#: Each name of the package, by the module that defines it.
_FROM = {
    "call_service": "tasks.calls",
    "replay": "tasks.calls",
    "app": "tasks.celeryapp",
    "dispatch_event": "tasks.events",
    "requeue_stuck_events": "tasks.events",
    "run_handler": "tasks.events",
    "poll_mailbox": "tasks.inbox",
    "dispatch_deferred": "tasks.maintenance",
    "health_check": "tasks.maintenance",
    "prune_ledger": "tasks.maintenance",
    "requeue_stuck_jobs": "tasks.maintenance",
    "deliver_webhook": "tasks.webhooks",
    "dispatch_deliveries": "tasks.webhooks",
    "publish_now": "tasks.webhooks",
    "publish_webhook": "tasks.webhooks",
}


def __getattr__(name: str) -> Any:
    if name not in _FROM:
        raise AttributeError(f"module 'tasks' has no attribute {name!r}")
    # Every module, whichever name is asked for: every task is registered wherever the app is,
    # and the app's signal wiring (logs, metrics, traces) with them.
    for module in ("tasks.observe", *dict.fromkeys(_FROM.values())):
        importlib.import_module(module)
    value = getattr(importlib.import_module(_FROM[name]), name)
    globals()[name] = value
    return value


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
