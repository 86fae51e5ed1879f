"""Prometheus metrics: what the exporter and the receiver serve.

:func:`exporter_registry` (``integrations metrics``) merges the files of every role
but the receiver's and adds the state that lives elsewhere, read at most every
``METRICS_CACHE_SECONDS`` by this one process, never per scrape of every process: open jobs by
service and status and the age of the oldest (one grouped query of the ledger), breaker states
and pauses (Redis), outgoing endpoints (ledger) and the broker's queue depths. The receiver
serves its own role's files at its ``/metrics`` (:func:`receiver_registry`), so nothing is
counted twice when Prometheus scrapes both.

The counters and histograms themselves are recorded by each process through
:mod:`integrations.observability.metrics`.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from integrations.config import get_settings
from integrations.config.settings import private_dir
from integrations.observability.metrics import RECEIVER

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)


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
