"""What observing a job costs a worker, in CPU time per job (issue 15).

Runs, in one process and without the network, the calls the job path makes for one job that
succeeds at its first attempt (``journal.submitted``, ``journal.limited``,
``journal.attempted``, and the spans ``job.submit``, ``job.limiter``, ``job.claim``,
``job.attempt``, ``job.record``), in four set-ups:

  off        nothing recorded (an agent's process without PROMETHEUS_MULTIPROC_DIR, no tracing)
  metrics    the worker's default: prometheus_client's multiprocess files, tracing off
  +logs      the same with the INFO job lines formatted as JSON (to /dev/null)
  +traces    the same with spans made and exported in batches (to an exporter that drops them)

CPU time (``time.process_time``) is what a loaded machine does not distort much: the figure
is this process's own work, however many other processes share the cores. Usage:
``python tests/bench_observe.py [-n 20000]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

from integrations.ledger.jobs import Claim
from integrations.ledger.models import JobStatus, utcnow


def per_job(n: int, fn: Callable[[], None], rounds: int = 5) -> float:
    """Median CPU microseconds of ``fn`` over ``rounds`` rounds of ``n`` calls."""
    fn()  # first use: metric values made, files opened
    samples = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        samples.append((time.process_time() - t0) / n * 1e6)
    return statistics.median(samples)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20000)
    args = ap.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="bench-observe-")
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    os.environ.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    os.environ["VAR_DIR"] = folder
    logging.getLogger().setLevel(logging.WARNING)

    from integrations.observability import journal, metrics, traces

    claim = Claim(
        "00000000-0000-4000-8000-000000000000", "stub", "echo", {"key": "b"}, 1, created_at=utcnow()
    )

    def one_job() -> None:
        with traces.span("job.submit"):
            journal.submitted(claim.job_id, "stub", "echo", None)
        with traces.span("job.limiter"):
            journal.limited("stub", True, False)
        with traces.span("job.claim"):
            pass
        with traces.span("job.attempt", **{"job.id": claim.job_id, "job.attempt": 1}):
            pass
        with traces.span("job.record"):
            pass
        journal.attempted(claim, None, JobStatus.SUCCEEDED, 200, 12.5)

    results: dict[str, float] = {}
    results["off"] = per_job(args.n, one_job)
    metrics.start("bench")
    results["metrics"] = per_job(args.n, one_job)

    from integrations.observability import logs

    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 (for the process's life)
    handler.setFormatter(logs.JsonFormatter())
    logging.getLogger().addHandler(handler)
    logging.getLogger("integrations.jobs").setLevel(logging.INFO)
    results["metrics+logs"] = per_job(args.n, one_job)
    logging.getLogger("integrations.jobs").setLevel(logging.WARNING)

    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    trace.set_tracer_provider(provider)
    traces._decided = False  # as in an agent's process that set up its own provider
    assert traces.active()
    results["metrics+traces"] = per_job(args.n, one_job)
    provider.shutdown()
    out = {k: round(v, 2) for k, v in results.items()}
    print(json.dumps({"cpu_us_per_job": out, "jobs_per_round": args.n, "rounds": 5}, indent=2))


if __name__ == "__main__":
    main()
