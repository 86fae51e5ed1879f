"""Prometheus metrics: what each process records, and what the exporter serves.

Recording. A process of the app records once it called :func:`start` with its role (the app
layer does it: a worker node at start, beat, the receiver); any other process (an agent's)
records only when ``PROMETHEUS_MULTIPROC_DIR`` is set in its environment. Values go to
prometheus_client's multiprocess files in that folder (default ``VAR_DIR/metrics``, made
owner-only), so the children of a prefork worker, beat and the submitters on one host add up.
Each file is named after its process's role, host and pid (``counter_worker.host.1234.db``):
replicas sharing one folder (a Compose volume) never write the same file.

Serving. :func:`exporter_registry` (``integrations metrics``) merges the files of every role
but the receiver's and adds the state that lives elsewhere, read at most every
``METRICS_CACHE_SECONDS`` by this one process, never per scrape of every process: open jobs by
service and status and the age of the oldest (one grouped query of the ledger), breaker states
and pauses (Redis), outgoing endpoints (ledger) and the broker's queue depths. The receiver
serves its own role's files at its ``/metrics`` (:func:`receiver_registry`), so nothing is
counted twice when Prometheus scrapes both.

Labels stay bounded: services, operations, webhook sources and mailboxes come from the services
file, status codes and error classes from small sets. No job id, connection or agent name is a
label, unless the operator asks for agents (``METRICS_AGENT_LABELS=true``).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from integrations.config import get_settings
from integrations.config.settings import private_dir

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------


def _role_of(path: str) -> str:
    # counter_worker.host.1234.db, gauge_livesum_worker.host.1234.db: the role is the last
    # part's first dotted field.
    return os.path.basename(path).rsplit("_", 1)[-1].split(".", 1)[0]


class FilesCollector:
    """The multiprocess files of the roles ``wanted`` says yes to, merged."""

    def __init__(self, folder: Path, wanted: Callable[[str], bool]) -> None:
        self.folder = folder
        self.wanted = wanted

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = [f for f in glob.glob(str(self.folder / "*.db")) if self.wanted(_role_of(f))]
        merged: Iterable[Metric] = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        return merged


@dataclass
class Snapshot:
    """The state that lives outside the processes' files, read at once."""

    #: (service, status) -> (jobs, seconds since the oldest of them moved there)
    open_jobs: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    breakers: dict[str, float] = field(default_factory=dict)
    paused: dict[str, float] = field(default_factory=dict)
    endpoints: dict[str, bool] = field(default_factory=dict)
    queues: dict[str, int] = field(default_factory=dict)
    #: Each source read (ledger, redis, broker): 1 when it answered.
    up: dict[str, float] = field(default_factory=dict)
    took: float = 0.0


#: Breaker states as gauge values.
BREAKER_STATES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


def read_snapshot(queues: Callable[[], Mapping[str, int]]) -> Snapshot:
    """Read the ledger (one grouped query of the open jobs, and the endpoints), Redis (each
    service's breaker and pause) and the broker (``queues()``); a source that fails is
    reported down (``integrations_exporter_source_up``), the others still are."""
    from integrations import breaker, coordination
    from integrations.ledger import deliveries, reads
    from integrations.services import get_services

    t0 = time.perf_counter()
    snap = Snapshot()

    def read(source: str, fn: Callable[[], None]) -> None:
        try:
            fn()
            snap.up[source] = 1.0
        except Exception as e:  # one source down must not hide the others
            snap.up[source] = 0.0
            log.warning("metrics: %s not read (%s)", source, type(e).__name__)

    def from_ledger() -> None:
        snap.open_jobs = reads.open_jobs()
        snap.endpoints = {e["id"]: bool(e["enabled"]) for e in deliveries.list_endpoints()}

    def from_redis() -> None:
        for name in get_services():
            snap.breakers[name] = BREAKER_STATES.get(breaker.state(name), 0.0)
            snap.paused[name] = coordination.paused_for(name)

    def from_broker() -> None:
        snap.queues = dict(queues())

    read("ledger", from_ledger)
    read("redis", from_redis)
    read("broker", from_broker)
    snap.took = time.perf_counter() - t0
    return snap


class StateCollector:
    """The :class:`Snapshot` as gauges, read again when older than ``max_age`` seconds."""

    def __init__(self, read: Callable[[], Snapshot], max_age: float) -> None:
        self._read = read
        self._max_age = max_age
        self._lock = threading.Lock()
        self._snap: Snapshot | None = None
        self._at = 0.0

    def snapshot(self) -> Snapshot:
        with self._lock:
            if self._snap is None or time.monotonic() - self._at >= self._max_age:
                self._snap = self._read()
                self._at = time.monotonic()
            return self._snap

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        s = self.snapshot()
        jobs = GaugeMetricFamily(
            "integrations_jobs_open",
            "Jobs in the ledger not yet settled, by status.",
            labels=["service", "status"],
        )
        oldest = GaugeMetricFamily(
            "integrations_jobs_oldest_seconds",
            "Seconds since the oldest job of this status last moved (queued: its wait).",
            labels=["service", "status"],
        )
        for (service, status), (count, age) in sorted(s.open_jobs.items()):
            jobs.add_metric([service, status], count)
            oldest.add_metric([service, status], age)
        breakers = GaugeMetricFamily(
            "integrations_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open.",
            labels=["service"],
        )
        paused = GaugeMetricFamily(
            "integrations_paused_seconds",
            "Seconds left of a pause the upstream asked for.",
            labels=["service"],
        )
        for service, value in sorted(s.breakers.items()):
            breakers.add_metric([service], value)
            paused.add_metric([service], s.paused.get(service, 0.0))
        endpoints = GaugeMetricFamily(
            "integrations_endpoint_enabled", "Outgoing webhook endpoint: 1 enabled, 0 disabled.",
            labels=["endpoint"],
        )  # fmt: skip
        for endpoint, enabled in sorted(s.endpoints.items()):
            endpoints.add_metric([endpoint], 1.0 if enabled else 0.0)
        queues = GaugeMetricFamily(
            "integrations_queue_messages", "Messages waiting in the broker's queue.", labels=["queue"]
        )
        for queue, depth in sorted(s.queues.items()):
            queues.add_metric([queue], depth)
        up = GaugeMetricFamily(
            "integrations_exporter_source_up", "1 when the exporter's last read of this source answered.",
            labels=["source"],
        )  # fmt: skip
        for source, value in sorted(s.up.items()):
            up.add_metric([source], value)
        took = GaugeMetricFamily(
            "integrations_exporter_read_seconds", "How long the last read of the sources took."
        )
        took.add_metric([], s.took)
        yield from (jobs, oldest, breakers, paused, endpoints, queues, up, took)


def exporter_registry(
    queues: Callable[[], Mapping[str, int]], folder: Path | None = None
) -> CollectorRegistry:
    """What ``integrations metrics`` serves: every role's files but the receiver's, and the
    state snapshot (``queues()`` gives the broker's depths)."""
    from prometheus_client import CollectorRegistry

    s = get_settings()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FilesCollector(folder or private_dir(s.metrics_dir), lambda role: role != RECEIVER))
    registry.register(StateCollector(lambda: read_snapshot(queues), s.metrics_cache_seconds))
    return registry


def receiver_registry(folder: Path | None = None) -> CollectorRegistry:
    """What the receiver serves at ``/metrics``: its own processes' files."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        FilesCollector(folder or private_dir(get_settings().metrics_dir), lambda role: role == RECEIVER)
    )
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus's text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST


def serve(registry: CollectorRegistry, host: str, port: int, stop: threading.Event) -> None:
    """Serve ``/metrics`` on ``host:port`` until ``stop`` is set."""
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=host, registry=registry)
    log.info("serving metrics at http://%s:%d/metrics", host, port)
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a ``/metrics`` text: ``(name, labels) -> value`` (for tests and checks)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def family_names(text: str) -> set[str]:
    """The names a ``/metrics`` text declares: each family's, and its samples' (``_total``,
    ``_bucket``...); a gauge with nothing to report now (no open job) is declared all the same."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def value(samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)
