"""A job's two halves, free of Celery: accepting it (validate, write, publish) and one attempt at it."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from integrations import auth, ledger
from integrations.config import get_settings
from integrations.errors import InvalidParams, PermanentError, SubmitError, UnknownOperation, UnknownService
from integrations.jsonlimits import too_deep
from integrations.ledger import reads
from integrations.ledger.jobs import Claim
from integrations.ledger.models import JobStatus
from integrations.observability import journal, traces
from integrations.services import Attempt, Operation, Outcome, Service, get_services
from integrations.services.params import has_dropped

#: ``publish(service, job_id, agent)`` puts a job's message on the broker.
Publish = Callable[[str, str, str | None], None]

#: Params nested deeper than this are refused at submit (no call needs it; parsers recurse).
PARAMS_DEPTH_MAX = 32

_AGENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,99}")


def valid_name(value: object) -> bool:
    """Whether ``value`` is a valid agent or connection name."""
    return isinstance(value, str) and _AGENT.fullmatch(value) is not None


def resolve(service: str, operation: str) -> tuple[Service, Operation]:
    services = get_services()
    svc = services.get(service) if isinstance(service, str) else None
    if svc is None:
        known = ", ".join(sorted(services)) or "none"
        raise UnknownService(f"unknown service (known: {known})")
    op = svc.operation(operation) if isinstance(operation, str) else None
    if op is None:
        known = ", ".join(sorted(svc.catalog()))
        raise UnknownOperation(f"service {service!r} has no such operation (it has: {known})")
    return svc, op


def prepare(service: str, operation: str, params: Any) -> dict[str, Any]:
    """Validate a call before anything is written; return the params as they will be sent.

    Raises :class:`InvalidParams` for params that do not match the operation's schema, that
    are not JSON values, or that are larger than ``PARAMS_MAX_BYTES`` (they are stored)."""
    _, op = resolve(service, operation)
    where = f"{service}.{operation}"
    if too_deep(params, PARAMS_DEPTH_MAX):
        raise InvalidParams(f"{where}: params are nested deeper than {PARAMS_DEPTH_MAX} levels")
    try:
        json.dumps(params, allow_nan=False)  # NaN and infinities are no JSON, whatever the schema
        clean = op.validate_params(params)
        # Measured as the ledger stores it (SQLAlchemy's JSON: json.dumps, default separators).
        size = len(json.dumps(clean, allow_nan=False, ensure_ascii=False).encode("utf-8"))
    except InvalidParams as e:
        raise InvalidParams(f"{where}: {e}") from None
    except UnicodeEncodeError:
        raise InvalidParams(f"{where}: params must be valid Unicode text (a lone surrogate)") from None
    except (TypeError, ValueError, RecursionError):
        raise InvalidParams(f"{where}: params must be JSON values (text, numbers, lists, mappings)") from None
    limit = get_settings().params_max_bytes
    if size > limit:
        raise InvalidParams(f"{service}.{operation}: params are larger than {limit} bytes (PARAMS_MAX_BYTES)")
    return clean


@traces.spanned("job.submit")
def enqueue(
    service: str,
    operation: str,
    params: Any,
    idempotency_key: str | None,
    publish: Publish,
    *,
    agent: str | None = None,
    replay_of: str | None = None,
    connection: str | None = None,
) -> tuple[str, bool]:
    """Validate, write the job row, then ``publish(service, job_id, agent)``; return ``(job_id, created)``.

    Nothing is written when validation fails. A reused ``idempotency_key`` returns the existing
    job and publishes nothing. When the ledger is unreachable nothing is queued; when publishing
    fails the row is settled as failed. Both raise :class:`SubmitError`, so the caller always
    knows, and no job is left queued with no message.

    ``connection`` names the end user's connection the job acts for (kept on the job row, never
    on the broker): required by a service whose auth is per user, refused by every other.
    """
    if idempotency_key is not None and not (
        isinstance(idempotency_key, str) and 0 < len(idempotency_key) <= 255 and idempotency_key.isprintable()
    ):
        raise InvalidParams("idempotency_key must be 1 to 255 printable characters")
    if agent is not None and not (isinstance(agent, str) and _AGENT.fullmatch(agent)):
        raise InvalidParams(
            "agent must be 1 to 100 letters, digits or '_.:@-', starting with a letter or digit"
        )
    if connection is not None and not valid_name(connection):
        raise InvalidParams(
            "connection must be 1 to 100 letters, digits or '_.:@-', starting with a letter or digit"
        )
    clean = prepare(service, operation, params)
    refused = auth.connection_refused(resolve(service, operation)[0], connection)
    if refused:
        raise InvalidParams(refused)
    try:
        job_id, created = ledger.jobs.create_job(
            service,
            operation,
            clean,
            idempotency_key,
            replay_of=replay_of,
            agent=agent,
            connection=connection,
            trace_context=traces.carrier(),
        )
    except SQLAlchemyError as e:
        raise SubmitError(
            "could not record the job: the ledger database is unavailable"
            f" ({type(e).__name__}); nothing was queued"
        ) from e
    if created:
        try:
            publish(service, job_id, agent)
        except Exception as e:
            reason = f"could not queue the job: broker unavailable ({type(e).__name__})"
            ledger.jobs.fail_unqueued(job_id, reason)
            raise SubmitError(f"{reason}; job {job_id} was not run") from e
        journal.submitted(job_id, service, operation, agent)
    return job_id, created


def replay(job_id: str, publish: Publish) -> str:
    """Submit a failed job again as a new job linked to it (``replay_of``); return the new id.

    The params are checked again against today's services file, so a job whose operation is
    gone fails here with a clear error rather than in the worker.
    """
    try:
        old = reads.get_job(job_id)
    except SQLAlchemyError as e:
        raise SubmitError(f"could not read the ledger ({type(e).__name__})") from e
    if old is None:
        raise SubmitError(f"no job with id {job_id}")
    if old["status"] != JobStatus.FAILED:
        raise SubmitError(f"job {job_id} is {old['status']}; only failed jobs are replayed")
    if has_dropped(old["params"]):
        raise SubmitError(f"job {job_id} carried content the ledger does not keep; submit it anew")
    new_id, _ = enqueue(
        old["service"],
        old["operation"],
        old["params"],
        None,
        publish,
        agent=old["agent"],
        replay_of=job_id,
        connection=old["connection"],
    )
    return new_id


def perform(svc: Service, claim: Claim, agent: str | None = None) -> Outcome:
    """Make one attempt at a claimed job: the outcome, or the kind's typed error."""
    op = svc.operation(claim.operation)
    if op is None:
        raise PermanentError(f"service {svc.name} no longer has operation {claim.operation!r}")
    return svc.call(op, claim.params, Attempt(claim.job_id, claim.attempt, agent, claim.connection))
