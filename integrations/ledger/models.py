"""The ledger's tables: jobs and their attempts, events and their handlings, outgoing deliveries,
end users' connections."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    DEFERRED = "deferred"  # parked until next_attempt_at; beat's dispatcher queues it again
    SUCCEEDED = "succeeded"
    FAILED = "failed"


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """An aware UTC datetime on every backend (SQLite stores none of the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is not None and dialect.name == "sqlite":
            return value.astimezone(dt.UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value


class OuterText(TypeDecorator[str]):
    """Text that came from outside (an upstream's answer or error, a sender's event type): a NUL,
    which PostgreSQL refuses in text, is stored as U+FFFD instead of failing the write."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is not None and "\x00" in value:
            return value.replace("\x00", "\ufffd")
        return value


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("uq_jobs_service_idempotency_key", "service", "idempotency_key", unique=True),
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index("ix_jobs_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_jobs_replay_of", "replay_of"),
        # `integrations stats`: the groups in order and each group's latencies sorted, with
        # every other column the statistics read, so the index alone answers (no sort of the
        # ledger, no visit of its rows).
        Index(
            "ix_jobs_service_operation_latency_ms",
            "service",
            "operation",
            "latency_ms",
            "status",
            "created_at",
            "input_tokens",
            "output_tokens",
        ),
        # `stats --since` and `prune`: the jobs of a time window (a job finishes after it is made).
        Index("ix_jobs_created_at", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    service: Mapped[str] = mapped_column(String(100))
    operation: Mapped[str] = mapped_column(String(100))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(OuterText)
    response_excerpt: Mapped[str | None] = mapped_column(OuterText)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    replay_of: Mapped[str | None] = mapped_column(String(36))
    #: Who submitted the job (an agent's name); per-agent rate limits key on it.
    agent: Mapped[str | None] = mapped_column(String(100))
    #: The end user's connection the job acts for (its name, never its tokens).
    connection: Mapped[str | None] = mapped_column(String(100))
    #: What the service's kind keeps of the outcome (warnings, the model that answered, ...).
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    input_tokens: Mapped[int | None] = mapped_column(Integer)
    output_tokens: Mapped[int | None] = mapped_column(Integer)
    #: The worker node (one run of it) that claimed the job, while it runs: when that node is
    #: lost, the sweeper publishes the job again without waiting for STUCK_AFTER.
    node: Mapped[str | None] = mapped_column(String(200))
    #: The trace the job was submitted in (W3C ``traceparent``/``tracestate``), so beat's
    #: dispatchers re-queue it into the same trace. ``None`` when its submitter did not trace.
    trace_context: Mapped[dict[str, str] | None] = mapped_column(JSON)


class BreakerEvent(Base):
    """A circuit breaker's change of state, with its time and reason."""

    __tablename__ = "breaker_events"
    __table_args__ = (Index("ix_breaker_events_service_at", "service", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    service: Mapped[str] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(OuterText)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class JobAttempt(Base):
    __tablename__ = "job_attempts"
    __table_args__ = (Index("uq_job_attempts_job_id_number", "job_id", "number", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Looked up through uq_job_attempts_job_id_number, which leads with it.
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(OuterText)
    response_excerpt: Mapped[str | None] = mapped_column(OuterText)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class HealthCheck(Base):
    """One health check of a service, run by beat."""

    __tablename__ = "health_checks"
    __table_args__ = (
        Index("ix_health_checks_service_checked_at", "service", "checked_at"),
        # The last passing and the last failing check of a service, each found in one step.
        Index("ix_health_checks_service_ok_checked_at", "service", "ok", "checked_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    service: Mapped[str] = mapped_column(String(100))
    ok: Mapped[bool] = mapped_column(Boolean)
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(OuterText)
    checked_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class Event(Base):
    """A verified incoming event (a webhook, an e-mail), stored once per sender's delivery id."""

    __tablename__ = "events"
    __table_args__ = (
        Index("uq_events_source_delivery_id", "source", "delivery_id", unique=True),
        Index("ix_events_received_at", "received_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    source: Mapped[str] = mapped_column(String(100))
    event_type: Mapped[str] = mapped_column(String(200))
    delivery_id: Mapped[str] = mapped_column(String(255))
    payload: Mapped[Any] = mapped_column(JSON)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    #: When the event was handed to its handlers; ``None`` until then (the sweeper's cue).
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class HandlingStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class EventHandling(Base):
    """One handler's work on one event, with its outcome."""

    __tablename__ = "event_handlings"
    __table_args__ = (
        Index("uq_event_handlings_event_id_handler", "event_id", "handler", unique=True),
        Index("ix_event_handlings_status_updated_at", "status", "updated_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(36), ForeignKey("events.id", ondelete="CASCADE"))
    handler: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default=HandlingStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(OuterText)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class Endpoint(Base):
    """A receiver of our outgoing webhooks. The secret stays here: no command prints it again."""

    __tablename__ = "endpoints"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(Text)
    #: Event-type patterns the endpoint subscribes to (``*`` wildcards).
    event_types: Mapped[list[str]] = mapped_column(JSON)
    description: Mapped[str | None] = mapped_column(OuterText)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(OuterText)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_success_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    #: The first failure since the last success (or since it was enabled); None while healthy.
    failing_since: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # waiting for next_attempt_at; beat's dispatcher queues it
    SENDING = "sending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Delivery(Base):
    """One event for one endpoint. Its id is the ``webhook-id`` of every try."""

    __tablename__ = "deliveries"
    __table_args__ = (
        Index("ix_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_deliveries_endpoint_id_created_at", "endpoint_id", "created_at"),
        Index("ix_deliveries_finished_at", "finished_at"),  # `integrations prune`
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(String(36), ForeignKey("endpoints.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(String(200))
    #: The exact bytes sent (and signed) on every try.
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    #: When its try was last put on the queue: the dispatcher does not queue it again meanwhile.
    queued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(OuterText)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempts"
    __table_args__ = (Index("uq_delivery_attempts_delivery_id_number", "delivery_id", "number", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(String(40), ForeignKey("deliveries.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    ok: Mapped[bool] = mapped_column(Boolean)
    status_code: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(OuterText)
    response_excerpt: Mapped[str | None] = mapped_column(OuterText)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class MailboxCursor(Base):
    """How far beat has read a mailbox: the folder's UIDVALIDITY and the last UID dispatched."""

    __tablename__ = "mailbox_cursors"

    mailbox: Mapped[str] = mapped_column(String(100), primary_key=True)
    # Both are unsigned 32-bit numbers in IMAP: too large for a signed INTEGER.
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class ConnectionStatus(StrEnum):
    PENDING = "pending"  # authorization started, no tokens yet
    ACTIVE = "active"
    NEEDS_REAUTH = "needs_reauth"  # the provider refused the grant (invalid_grant)
    REVOKED = "revoked"


class Connection(Base):
    """A named credential of one service for one end user, or the service's own token (name
    ``*``: client credentials, a JWT bearer grant, a GitHub App installation).

    ``tokens`` is a Fernet token (:mod:`integrations.auth.keys`) of the JSON of the access
    token, the refresh token and their type; ``key_id`` names the key it was encrypted with,
    and ``version`` goes up with every write of them."""

    __tablename__ = "connections"
    __table_args__ = (Index("uq_connections_service_name", "service", "name", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    service: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16))
    #: Whom the credential acts as, when that is not in the tokens: the user a JWT bearer grant
    #: names, a GitHub App's installation id. Not a secret.
    subject: Mapped[str | None] = mapped_column(String(255))
    scopes: Mapped[list[str] | None] = mapped_column(JSON)
    tokens: Mapped[str | None] = mapped_column(Text)
    key_id: Mapped[str | None] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    refreshed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)


class OAuthState(Base):
    """An authorization in progress: the ``state`` sent to the provider (kept as its SHA-256
    only), bound to one service and connection, with its PKCE verifier (encrypted). Used once."""

    __tablename__ = "oauth_states"

    state_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    service: Mapped[str] = mapped_column(String(100))
    connection: Mapped[str] = mapped_column(String(100))
    verifier: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str] = mapped_column(String(16))
    redirect_uri: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
