"""Prometheus metrics: what each process records.

Recording. A process of the app records once it called :func:`start` with its role (the app
layer does it: a worker node at start, beat, the receiver); any other process (an agent's)
records only when ``PROMETHEUS_MULTIPROC_DIR`` is set in its environment. Values go to
prometheus_client's multiprocess files in that folder (default ``VAR_DIR/metrics``, made
owner-only), so the children of a prefork worker, beat and the submitters on one host add up.
Each file is named after its process's role, host and pid (``counter_worker.host.1234.db``):
replicas sharing one folder (a Compose volume) never write the same file.

Serving those files, with the state that lives elsewhere, is
:mod:`integrations.observability.metrics_exporter`'s.

Labels stay bounded: services, operations, webhook sources and mailboxes come from the services
file, status codes and error classes from small sets. No job id, connection or agent name is a
label, unless the operator asks for agents (``METRICS_AGENT_LABELS=true``).
"""

from __future__ import annotations

import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from integrations.config import get_settings
from integrations.config.settings import private_dir

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

#: The role whose files the receiver serves, and the exporter leaves to it.
RECEIVER = "receiver"

_HOST = re.sub(r"[^A-Za-z0-9.-]+", "-", socket.gethostname()) or "host"
_lock = threading.Lock()
_role: str | None = None
_checked = False
_metrics: _Metrics | None = None


_named: tuple[int, str | None, str] = (0, None, "")


def _identity() -> str:
    """This process's part of its files' names: role, host, pid (no ``_``: prometheus_client
    splits file names at it). prometheus_client asks at every value recorded, to see a fork."""
    global _named
    pid = os.getpid()
    if _named[0] != pid or _named[1] != _role:
        _named = (pid, _role, f"{_role}.{_HOST}.{pid}")
    return _named[2]


def start(role: str) -> Path:
    """Record this process's metrics (and its forked children's) as ``role`` from now on;
    return the folder they go to. Made owner-only when it is this user's."""
    global _role, _checked, _metrics
    from prometheus_client import values

    folder = private_dir(get_settings().metrics_dir).resolve()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    with _lock:
        _role = re.sub(r"[^A-Za-z0-9-]+", "-", role)
        values.ValueClass = values.MultiProcessValue(_identity)  # type: ignore[no-untyped-call]
        _metrics = None  # made again, in the files, at the next value recorded
        _checked = True
    return folder


def recording() -> bool:
    return _get() is not None


def _get() -> _Metrics | None:
    global _checked, _metrics
    m = _metrics
    if m is not None or (_checked and _role is None):
        return m
    if _role is None:
        _checked = True
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return None  # an agent's process that did not ask for metrics: nothing is written
        start("agent")
    with _lock:
        if _metrics is None:
            _metrics = _Metrics.make(get_settings().metrics_agent_labels)
        return _metrics


# Latency buckets (seconds): an upstream call, a job from submit to its outcome, a wait.
_ATTEMPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_JOB_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)


@dataclass(frozen=True)
class _Metrics:
    agent_labels: bool
    submitted: Counter
    finished: Counter
    attempts: Counter
    retried: Counter
    deferred: Counter
    attempt_seconds: Histogram
    job_seconds: Histogram
    upstream: Counter
    limiter_slots: Counter
    limiter_wait: Histogram
    pauses: Counter
    tokens: Counter
    webhooks: Counter
    deliveries: Counter
    polls: Counter
    messages: Counter

    @classmethod
    def make(cls, agent_labels: bool) -> _Metrics:
        from prometheus_client import Counter, Histogram

        agent = ("agent",) if agent_labels else ()
        job = ("service", "operation")

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            return Counter(name, doc, labels, registry=None)

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=None)

        return cls(
            agent_labels=agent_labels,
            submitted=counter(
                "integrations_jobs_submitted", "Jobs accepted (written and queued).", job + agent
            ),
            finished=counter(
                "integrations_jobs_finished", "Jobs settled, by outcome (succeeded, failed).",
                (*job, "outcome", *agent),
            ),
            attempts=counter(
                "integrations_job_attempts", "Attempts made, by what they left the job (succeeded, "
                "retrying, failed).", (*job, "outcome"),
            ),
            retried=counter(
                "integrations_jobs_retried", "Attempts that failed and will be retried, by error class.",
                (*job, "error"),
            ),
            deferred=counter(
                "integrations_jobs_deferred", "Runs put off without an attempt, by cause (limit, pause, "
                "breaker, ledger).", ("service", "cause"),
            ),
            attempt_seconds=histogram(
                "integrations_attempt_seconds", "One attempt's upstream latency.", job, _ATTEMPT_BUCKETS
            ),
            job_seconds=histogram(
                "integrations_job_seconds", "From submit to the outcome.", (*job, "outcome"), _JOB_BUCKETS
            ),
            upstream=counter(
                "integrations_upstream_responses", "Upstream answers by status code (none: no answer).",
                (*job, "code"),
            ),
            limiter_slots=counter(
                "integrations_limiter_slots", "Rate-limit slots taken: now, or kept for a deferred run.",
                ("service", "when"),
            ),
            limiter_wait=histogram(
                "integrations_limiter_wait_seconds", "How long a run was put off by a limit or a pause.",
                ("service", "cause"), _WAIT_BUCKETS,
            ),
            pauses=counter(
                "integrations_pauses", "Pauses an upstream asked for (Retry-After), by scope kind.",
                ("service", "scope"),
            ),
            tokens=counter(
                "integrations_llm_tokens", "Tokens used by LLM calls, by direction (input, output).",
                (*job, "direction"),
            ),
            webhooks=counter(
                "integrations_webhooks_received", "Webhook requests by source and the status answered.",
                ("source", "code"),
            ),
            deliveries=counter(
                "integrations_deliveries", "Outgoing webhook tries by outcome (succeeded, retrying, failed, "
                "skipped).", ("outcome",),
            ),
            polls=counter(
                "integrations_mailbox_polls", "Mailbox polls by outcome (ok, skipped, error).",
                ("mailbox", "outcome"),
            ),
            messages=counter(
                "integrations_mailbox_messages", "Messages a poll stored, by result (dispatched, duplicate).",
                ("mailbox", "result"),
            ),
        )  # fmt: skip


def _agent(m: _Metrics, agent: str | None) -> tuple[str, ...]:
    return (agent or "",) if m.agent_labels else ()


# --------------------------------------------------------------------------------------------
# Recording (each a no-op in a process that does not record)
# --------------------------------------------------------------------------------------------


def job_submitted(service: str, operation: str, agent: str | None) -> None:
    if (m := _get()) is not None:
        m.submitted.labels(service, operation, *_agent(m, agent)).inc()


def attempt(
    service: str, operation: str, outcome: str, seconds: float | None, status_code: int | None
) -> None:
    if (m := _get()) is not None:
        m.attempts.labels(service, operation, outcome).inc()
        if seconds is not None:
            m.attempt_seconds.labels(service, operation).observe(seconds)
        m.upstream.labels(service, operation, str(status_code) if status_code else "none").inc()


def job_retried(service: str, operation: str, error: str) -> None:
    if (m := _get()) is not None:
        m.retried.labels(service, operation, error).inc()


def job_finished(
    service: str, operation: str, outcome: str, agent: str | None, seconds: float | None
) -> None:
    if (m := _get()) is not None:
        m.finished.labels(service, operation, outcome, *_agent(m, agent)).inc()
        if seconds is not None:
            m.job_seconds.labels(service, operation, outcome).observe(seconds)


def job_deferred(service: str, cause: str, wait: float) -> None:
    if (m := _get()) is not None:
        m.deferred.labels(service, cause).inc()
        m.limiter_wait.labels(service, cause).observe(wait)


def limiter_slot(service: str, ahead: bool) -> None:
    if (m := _get()) is not None:
        m.limiter_slots.labels(service, "ahead" if ahead else "now").inc()


def paused(service: str, scope: str | None) -> None:
    """An upstream asked every worker to hold ``service`` (or one of its scopes: the kind of
    scope is the label, ``method`` of ``method:chat.postMessage``, never a channel's name)."""
    if (m := _get()) is not None:
        m.pauses.labels(service, scope.partition(":")[0] if scope else "service").inc()


def tokens(service: str, operation: str, input_tokens: int | None, output_tokens: int | None) -> None:
    if (m := _get()) is not None:
        if input_tokens:
            m.tokens.labels(service, operation, "input").inc(input_tokens)
        if output_tokens:
            m.tokens.labels(service, operation, "output").inc(output_tokens)


def webhook_received(source: str, code: int) -> None:
    if (m := _get()) is not None:
        m.webhooks.labels(source, str(code)).inc()


def delivery_tried(outcome: str) -> None:
    if (m := _get()) is not None:
        m.deliveries.labels(outcome).inc()


def mailbox_polled(mailbox: str, outcome: str, dispatched: int = 0, duplicates: int = 0) -> None:
    if (m := _get()) is not None:
        m.polls.labels(mailbox, outcome).inc()
        if dispatched:
            m.messages.labels(mailbox, "dispatched").inc(dispatched)
        if duplicates:
            m.messages.labels(mailbox, "duplicate").inc(duplicates)
