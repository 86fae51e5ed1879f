"""A service's health check: one check through its kind, judged healthy or not.

Free of Celery: the task in ``tasks.maintenance`` runs it on beat's schedule and records it.
"""

from __future__ import annotations

from dataclasses import dataclass

from integrations.errors import CallError
from integrations.services import Service


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status_code: int | None
    latency_ms: float | None
    error: str | None


def check(svc: Service) -> Outcome:
    """Run ``svc``'s configured check once: healthy unless the kind raises an error."""
    if svc.health is None:
        raise ValueError(f"service {svc.name} has no health check")
    try:
        out = svc.check_health()
    except CallError as e:
        return Outcome(False, e.status_code, e.latency_ms, str(e))
    return Outcome(True, out.status_code, out.latency_ms, None)
