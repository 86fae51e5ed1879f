"""What Celery beat runs, and how often. Data only: every entry names a task in ``tasks``.

Each entry sets ``expires`` close to its interval, so a worker that was stopped does not find
a pile of stale runs when it comes back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Dispatchers of work parked in the ledger: every 2 s.
DISPATCHERS: dict[str, dict[str, Any]] = {
    "dispatch-deferred-jobs": {
        "task": "integrations.dispatch_deferred",
        "schedule": 2.0,
        "options": {"expires": 2.0},
    },
    "dispatch-due-deliveries": {
        "task": "integrations.dispatch_deliveries",
        "schedule": 2.0,
        "options": {"expires": 2.0},
    },
}
#: Sweepers of work whose message was lost: every ``SWEEP_INTERVAL`` seconds.
SWEEPERS = {
    "requeue-stuck-jobs": "integrations.requeue_stuck_jobs",
    "requeue-stuck-events": "integrations.requeue_stuck_events",
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
    health_checks: Mapping[str, float],
    mailboxes: Mapping[str, float] | None = None,
    sweep_every: float = 60.0,
) -> dict[str, dict[str, Any]]:
    """The dispatchers, the sweepers every ``sweep_every`` seconds, a health check per service
    (``{service: interval}``) and a poll per mailbox (``{mailbox: interval}``)."""
    sweepers = {
        name: {"task": task, "schedule": sweep_every, "options": {"expires": sweep_every * 0.9}}
        for name, task in SWEEPERS.items()
    }
    return {
        **DISPATCHERS,
        **sweepers,
        **_every("integrations.health_check", health_checks, "health-check"),
        **_every("integrations.poll_mailbox", mailboxes or {}, "poll-mailbox"),
    }


#: How often beat prunes the ledger when ``LEDGER_RETENTION`` is set (seconds).
PRUNE_EVERY = 3600.0


def retention(keep_seconds: float | None, every: float = PRUNE_EVERY) -> dict[str, dict[str, Any]]:
    """The ledger's pruning every ``every`` seconds, of what finished more than
    ``keep_seconds`` ago; nothing without a retention."""
    if keep_seconds is None:
        return {}
    return {
        "prune-ledger": {
            "task": "integrations.prune_ledger",
            "schedule": every,
            "args": (keep_seconds,),
            "options": {"expires": every * 0.9},
        }
    }
