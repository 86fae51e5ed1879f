"""What Celery beat runs, and how often. Data only: every entry names a task in ``tasks``.

Each entry sets ``expires`` close to its interval, so a worker that was stopped does not find
a pile of stale runs when it comes back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SCHEDULE: dict[str, dict[str, Any]] = {
    "dispatch-deferred-jobs": {
        "task": "integrations.dispatch_deferred",
        "schedule": 2.0,
        "options": {"expires": 2.0},
    },
    "requeue-stuck-jobs": {
        "task": "integrations.requeue_stuck_jobs",
        "schedule": 60.0,
        "options": {"expires": 55.0},
    },
    "requeue-stuck-events": {
        "task": "integrations.requeue_stuck_events",
        "schedule": 60.0,
        "options": {"expires": 55.0},
    },
    "dispatch-due-deliveries": {
        "task": "integrations.dispatch_deliveries",
        "schedule": 2.0,
        "options": {"expires": 2.0},
    },
}


def _every(task: str, intervals: Mapping[str, float], prefix: str) -> dict[str, dict[str, Any]]:
    """One entry per name: ``task(name)`` every ``interval`` seconds, expiring after one."""
    return {
        f"{prefix}-{name}": {
            "task": task,
            "schedule": interval,
            "args": (name,),
            "options": {"expires": interval},
        }
        for name, interval in sorted(intervals.items())
    }


def build(
    health_checks: Mapping[str, float], mailboxes: Mapping[str, float] | None = None
) -> dict[str, dict[str, Any]]:
    """``SCHEDULE`` plus a health check per service (``{service: interval}``) and a poll per
    mailbox (``{mailbox: interval}``)."""
    return {
        **SCHEDULE,
        **_every("integrations.health_check", health_checks, "health-check"),
        **_every("integrations.poll_mailbox", mailboxes or {}, "poll-mailbox"),
    }
