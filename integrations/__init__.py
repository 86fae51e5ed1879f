"""agent-integrations: a Celery backend that calls external services for AI agents.

``submit()`` is the library twin of ``tasks.call_service.delay()``; both validate, write the
job row and publish only its id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery.result import AsyncResult


def submit(
    service: str, operation: str, params: dict[str, Any] | None = None, idempotency_key: str | None = None
) -> AsyncResult:
    """Submit a job; the same as ``call_service.delay(service, operation, params, idempotency_key=...)``."""
    from tasks import call_service

    return call_service.delay(service, operation, params, idempotency_key=idempotency_key)
