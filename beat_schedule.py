"""What Celery beat runs, and how often. Data only: every entry names a task in ``tasks``.

Each entry sets ``expires`` close to its interval, so a worker that was stopped does not find
a pile of stale runs when it comes back.
"""

from __future__ import annotations

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
}
