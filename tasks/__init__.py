"""The Celery app (``celery -A tasks worker``) and its tasks, one module per kind of work."""

from tasks.calls import call_service
from tasks.celeryapp import app
from tasks.maintenance import dispatch_deferred, health_check, requeue_stuck_jobs

__all__ = ["app", "call_service", "dispatch_deferred", "health_check", "requeue_stuck_jobs"]
