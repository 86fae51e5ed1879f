"""Service calls: ``call_service`` accepts a job; one task per service runs it by id.

The per-service tasks (``integrations.call.<service>``) carry the service's retry policy as
Celery's own options (``autoretry_for``, ``retry_backoff``, ``retry_backoff_max``,
``retry_jitter``, ``max_retries``) and its rate limit as a task annotation, so every policy
is data on a task and Celery does the retrying. They are registered when the app is finalized
(a worker starting), from the services file of that moment. Their body, one attempt of a job,
is :func:`tasks.attempts.run_job`; the attempt's outcome is recorded by :mod:`tasks.outcomes`.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.result import AsyncResult

from integrations import jobs
from integrations.errors import CallError, PermanentError, TransientError
from integrations.ledger import reads
from integrations.observability import traces
from integrations.services import Service, get_services
from tasks.attempts import run_job
from tasks.celeryapp import app
from tasks.celeryapp import call_task_name as task_name


def publish(service: str, job_id: str, agent: str | None = None) -> None:
    """Put job ``job_id`` on the broker for ``service``'s task.

    The message carries the job id (and the agent, for its rate limit) only: parameters and
    secrets stay in the ledger. When tracing, its headers carry the current trace context.
    """
    kwargs = {"agent": agent} if agent else {}
    app.send_task(task_name(service), (job_id,), kwargs, task_id=job_id, headers=traces.carrier())


def republish(service: str, job_id: str, agent: str | None = None) -> None:
    """:func:`publish` for beat's dispatchers and sweepers: the job goes back into the trace it
    was submitted in (kept in its row), not into the dispatcher's."""
    if not traces.active():
        publish(service, job_id, agent)
        return
    with traces.resumed(reads.trace_contexts([job_id]).get(job_id)):
        publish(service, job_id, agent)


class CallService(Task):  # type: ignore[misc]
    """``call_service.delay(service, operation, params, idempotency_key=None, agent=None,
    connection=None)``.

    Validates in the caller (unknown service, operation or params raise and nothing is written
    or queued), writes the job row, then publishes its id to the service's task. The returned
    ``AsyncResult`` has the job id as its id; ``.get()`` gives ``{job_id, status, status_code,
    data, ...}`` or raises the job's final error. A reused idempotency key returns the existing
    job's result and calls nothing upstream. ``agent`` names the submitter, for per-agent rate
    limits and the ledger. ``connection`` names the end user the job acts for (a service with
    per-user auth sends that connection's token); it stays on the job row, off the broker.
    """

    typing = False

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> AsyncResult:
        service, operation, params, key, agent, connection = _call_args(*(args or ()), **(kwargs or {}))
        job_id, _ = jobs.enqueue(service, operation, params, key, publish, agent=agent, connection=connection)
        return self.AsyncResult(job_id)


def _call_args(
    service: str,
    operation: str,
    params: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    agent: str | None = None,
    connection: str | None = None,
) -> tuple[str, str, dict[str, Any] | None, str | None, str | None, str | None]:
    return service, operation, params, idempotency_key, agent, connection


@app.task(base=CallService, name="integrations.call_service")
def call_service(
    service: str,
    operation: str,
    params: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    agent: str | None = None,
    connection: str | None = None,
) -> Any:
    """Called in-process (``call_service(...)``): accept the job and run it here."""
    job_id, _ = jobs.enqueue(
        service, operation, params, idempotency_key, lambda s, j, a: None, agent=agent, connection=connection
    )
    return app.tasks[task_name(service)].apply((job_id,), task_id=job_id).get()


def replay(job_id: str) -> AsyncResult:
    """Submit failed job ``job_id`` again as a new job linked to it; return the new job's result."""
    return call_service.AsyncResult(jobs.replay(job_id, publish))


#: Celery puts ``repr(result)`` cut to this length in its log and in the task-succeeded event
#: that Flower shows. Cut after the status code, so upstream data never gets there.
_RESULT_REPR_MAX = len(repr({"job_id": "0" * 36, "status": "succeeded", "status_code": 200}))


def register_service_task(svc: Service) -> Task:
    policy = svc.retry
    return app.task(
        run_job,
        service_name=svc.name,
        name=task_name(svc.name),
        bind=True,
        autoretry_for=(TransientError,),
        dont_autoretry_for=(PermanentError,),
        retry_backoff=policy.backoff,
        retry_backoff_max=policy.backoff_max,
        retry_jitter=policy.jitter,
        max_retries=policy.max_retries,
        # Expected outcomes: logged in one line, without a traceback.
        throws=(CallError,),
        resultrepr_maxsize=_RESULT_REPR_MAX,
        acks_late=True,
        reject_on_worker_lost=True,
    )


@app.on_after_finalize.connect
def _register_service_tasks(sender: Any, **_: Any) -> None:
    for svc in get_services().values():
        if task_name(svc.name) not in sender.tasks:
            register_service_task(svc)
