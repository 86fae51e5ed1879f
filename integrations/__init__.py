"""agent-integrations: a Celery backend that calls external services for AI agents.

``submit()`` is the library twin of ``tasks.call_service.delay()``; both validate, write the
job row and publish only its id. ``publish_webhook()`` sends an event to the endpoints
subscribed to it (outgoing webhooks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery.result import AsyncResult


def submit(
    service: str,
    operation: str,
    params: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    agent: str | None = None,
) -> AsyncResult:
    """Submit a job; the same as ``call_service.delay(service, operation, params, ...)``."""
    from tasks import call_service

    return call_service.delay(service, operation, params, idempotency_key=idempotency_key, agent=agent)


def replay(job_id: str) -> AsyncResult:
    """Submit failed job ``job_id`` again as a new job linked to it; return the new job's result."""
    from integrations.jobs import replay as replay_job
    from tasks import call_service
    from tasks.calls import publish

    return call_service.AsyncResult(replay_job(job_id, publish))


def publish_webhook(event_type: str, data: Any) -> list[str]:
    """Deliver an event to every endpoint subscribed to ``event_type``; return the delivery ids.

    The deliveries are stored before this returns and tried at once by the workers, then on
    the retry schedule; the same as ``tasks.publish_webhook.delay(event_type, data)``, minus
    the wait for a worker to create them.
    """
    from integrations.webhooks import outgoing
    from tasks.webhooks import deliver_webhook

    ids = outgoing.publish(event_type, data)
    for delivery_id in ids:
        deliver_webhook.delay(delivery_id)
    return ids
