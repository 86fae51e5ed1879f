"""A service's health check: one request through the HTTP choke point, judged by its status.

Free of Celery: the task in ``tasks.maintenance`` runs it on beat's schedule and records it.
"""

from __future__ import annotations

from dataclasses import dataclass

from integrations import http
from integrations.config import ServiceConfig, get_settings
from integrations.errors import CallError
from integrations.services import build_request


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status_code: int | None
    latency_ms: float | None
    error: str | None


def check(svc: ServiceConfig) -> Outcome:
    """Run ``svc``'s configured check once. 2xx is healthy; anything else says why not."""
    h = svc.health
    if h is None:
        raise ValueError(f"service {svc.name} has no health check")
    if h.operation is not None:
        op = svc.operations[h.operation]
        req = build_request(svc, op, op.validate_params(h.params))
    else:
        req = http.Request("GET", svc.base_url + (h.path or "/"))
    try:
        resp = http.send(svc, req, get_settings().response_max_bytes)
    except CallError as e:
        return Outcome(False, None, None, str(e))
    err = http.classify(resp, svc.retry.retry_after_max)
    return Outcome(err is None, resp.status_code, resp.latency_ms, None if err is None else str(err))
