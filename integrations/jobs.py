"""A job's two halves, free of Celery: accepting it (validate, write, publish) and one attempt at it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from integrations import http, ledger
from integrations.config import Operation, ServiceConfig, get_services, get_settings
from integrations.errors import InvalidParams, SubmitError, UnknownOperation, UnknownService
from integrations.ledger.jobs import Claim
from integrations.services import build_request


def resolve(service: str, operation: str) -> tuple[ServiceConfig, Operation]:
    services = get_services()
    svc = services.get(service)
    if svc is None:
        known = ", ".join(sorted(services)) or "none"
        raise UnknownService(f"unknown service {service!r} (known: {known})")
    op = svc.operations.get(operation)
    if op is None:
        known = ", ".join(sorted(svc.operations))
        raise UnknownOperation(f"service {service!r} has no operation {operation!r} (it has: {known})")
    return svc, op


def prepare(service: str, operation: str, params: Any) -> dict[str, Any]:
    """Validate a call before anything is written; return the params as they will be sent."""
    _, op = resolve(service, operation)
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidParams(f"{service}.{operation}: params must be a mapping of names to values")
    try:
        return op.validate_params(params)
    except InvalidParams as e:
        raise InvalidParams(f"{service}.{operation}: {e}") from None


def enqueue(
    service: str,
    operation: str,
    params: Any,
    idempotency_key: str | None,
    publish: Callable[[str, str], None],
) -> tuple[str, bool]:
    """Validate, write the job row, then ``publish(service, job_id)``; return ``(job_id, created)``.

    Nothing is written when validation fails. A reused ``idempotency_key`` returns the existing
    job and publishes nothing. When publishing fails the row is settled as failed and
    :class:`SubmitError` is raised, so no job is left queued with no message.
    """
    if idempotency_key is not None and not (
        isinstance(idempotency_key, str) and 0 < len(idempotency_key) <= 255
    ):
        raise InvalidParams("idempotency_key must be a string of 1 to 255 characters")
    clean = prepare(service, operation, params)
    job_id, created = ledger.jobs.create_job(service, operation, clean, idempotency_key)
    if created:
        try:
            publish(service, job_id)
        except Exception as e:
            reason = f"could not queue the job: broker unavailable ({type(e).__name__})"
            ledger.jobs.fail_unqueued(job_id, reason)
            raise SubmitError(f"{reason}; job {job_id} was not run") from e
    return job_id, created


def perform(claim: Claim) -> http.Response:
    """Make one attempt at a claimed job. Returns the 2xx response; raises a classified error."""
    svc, op = resolve(claim.service, claim.operation)
    resp = http.send(svc, build_request(svc, op, claim.params), get_settings().response_max_bytes)
    err = http.classify(resp, svc.retry.retry_after_max)
    if err is not None:
        err.response = resp
        raise err
    return resp
