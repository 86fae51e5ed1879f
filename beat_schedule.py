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


def with_health_checks(
    intervals: Mapping[str, float], mailboxes: Mapping[str, float] | None = None
) -> dict[str, dict[str, Any]]:
    """``SCHEDULE`` plus one health-check entry per service, from ``{service: interval}``, and
    one poll per mailbox, from ``{mailbox: interval}``."""
    return {
        **SCHEDULE,
        **{
            f"poll-mailbox-{mailbox}": {
                "task": "integrations.poll_mailbox",
                "schedule": interval,
                "args": (mailbox,),
                "options": {"expires": interval},
            }
            for mailbox, interval in sorted((mailboxes or {}).items())
        },
        **{
            f"health-check-{service}": {
                "task": "integrations.health_check",
                "schedule": interval,
                "args": (service,),
                "options": {"expires": interval},
            }
            for service, interval in sorted(intervals.items())
        },
    }
