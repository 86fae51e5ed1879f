"""Traces (issue 15), with the OpenTelemetry SDK's in-memory exporter and the real worker: a job
is one trace from the agent's span to the upstream's answer, across a retry and a deferral
parked in the ledger; the upstream receives a ``traceparent`` of that trace."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from asgi_server import serve
from conftest import GH_SECRET
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from stub import Reply, Stub

from integrations import jobs
from integrations.config import get_settings, get_webhooks
from integrations.ledger import reads, sweeps
from integrations.ledger.models import utcnow
from integrations.observability import traces
from integrations.observability.asgi import ObservedReceiver
from integrations.webhooks.receiver import create_app
from tasks import call_service
from tasks.events import publish_event
from tasks.maintenance import dispatch_deferred

pytestmark = pytest.mark.usefixtures("worker")

RUN = "run/integrations.call.stub"


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert traces.setup("tests", exporter=exporter)
    yield exporter
    traces.teardown()


def _trace(exporter: InMemorySpanExporter, trace_id: int, runs: int) -> list[ReadableSpan]:
    """The finished spans of ``trace_id``, once ``runs`` runs of the job's task have ended (a
    run's span ends after its result is stored)."""
    deadline = time.monotonic() + 20
    while True:
        found = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
        if sum(s.name == RUN for s in found) >= runs or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _parent(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> ReadableSpan | None:
    return by_id.get(span.parent.span_id) if span.parent is not None else None


def _ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    names = []
    while (parent := _parent(span, by_id)) is not None:
        names.append(parent.name)
        span = parent
    return names


def test_a_job_with_a_retry_is_one_trace_from_the_agents_span_to_the_upstream(
    spans: InMemorySpanExporter, stub: Stub, key: str
) -> None:
    stub.plan(key, Reply(500))  # the first attempt fails and is retried; the second succeeds
    with trace.get_tracer("an agent").start_as_current_span("agent decides") as agent:
        result = call_service.delay("stub", "echo", {"key": key}, agent="tracer")
    assert result.get(timeout=30)["attempts"] == 2
    trace_id = agent.get_span_context().trace_id
    found = _trace(spans, trace_id, runs=2)
    by_id = {s.context.span_id: s for s in found}
    names = Counter(s.name for s in found)

    assert names["job.submit"] == 1
    for name in (RUN, "job.limiter", "job.claim", "job.attempt", "job.record", "GET"):
        assert names[name] == 2, (name, names)
    submit = next(s for s in found if s.name == "job.submit")
    assert _parent(submit, by_id) is not None and _parent(submit, by_id).name == "agent decides"  # type: ignore[union-attr]
    assert submit.attributes is not None and submit.attributes["job.id"] == result.id
    first, second = sorted((s for s in found if s.name == RUN), key=lambda s: s.start_time or 0)
    # The first run descends from the submit (through Celery's publish), the second from the
    # first (its retry was published from inside it).
    assert "job.submit" in _ancestors(first, by_id) and RUN not in _ancestors(first, by_id)
    assert _ancestors(second, by_id).count(RUN) == 1 and first.name in _ancestors(second, by_id)
    for name in ("job.limiter", "job.claim", "job.attempt", "job.record"):
        assert {_parent(s, by_id).name for s in found if s.name == name} == {RUN}  # type: ignore[union-attr]
    gets = [s for s in found if s.name == "GET"]
    assert {_parent(s, by_id).name for s in gets} == {"job.attempt"}  # type: ignore[union-attr]
    failed = next(
        s for s in found if s.name == "job.attempt" and s.attributes and s.attributes["job.attempt"] == 1
    )
    assert failed.attributes is not None and failed.attributes["error.type"] == "TransientError"

    # The upstream received a traceparent of this trace on each attempt: its request's span.
    hits = stub.hits_for(key)
    assert len(hits) == 2
    sent = {tuple(h.headers["traceparent"].split("-")[1:3]) for h in hits}
    assert sent == {(f"{trace_id:032x}", f"{s.context.span_id:016x}") for s in gets}
    # The job row keeps the context it was submitted in; the params do not carry it.
    row = reads.get_job(result.id)
    assert row is not None and row["trace_context"]["traceparent"].split("-")[1] == f"{trace_id:032x}"
    assert row["params"] == {"key": key}


def test_a_job_parked_in_the_ledger_is_requeued_by_beat_into_its_own_trace(
    spans: InMemorySpanExporter, stub: Stub, key: str
) -> None:
    # Accepted (written, not yet published) in the agent's trace, then parked as a long
    # deferral is; beat's dispatcher, in a trace of its own, queues it again.
    with trace.get_tracer("an agent").start_as_current_span("agent decides") as agent:
        job_id, _ = jobs.enqueue("stub", "echo", {"key": key}, None, lambda *_: None)
    assert sweeps.park(job_id, utcnow())
    with trace.get_tracer("beat").start_as_current_span("beat tick") as tick:
        assert dispatch_deferred() >= 1
    assert call_service.AsyncResult(job_id).get(timeout=30)["status"] == "succeeded"

    found = _trace(spans, agent.get_span_context().trace_id, runs=1)
    run = next(s for s in found if s.name == RUN)
    assert "job.submit" in [a for a in _ancestors(run, {s.context.span_id: s for s in found})]
    beat_trace = [
        s for s in spans.get_finished_spans() if s.context.trace_id == tick.get_span_context().trace_id
    ]
    assert RUN not in {s.name for s in beat_trace}
    (hit,) = stub.hits_for(key)
    assert hit.headers["traceparent"].split("-")[1] == f"{agent.get_span_context().trace_id:032x}"


def test_with_tracing_off_nothing_is_made_and_nothing_is_sent(stub: Stub, key: str, monkeypatch: Any) -> None:
    # What a process without OTEL_EXPORTER_OTLP_ENDPOINT does: no span, no header, no context.
    monkeypatch.setattr(traces, "_tracer", None)
    monkeypatch.setattr(traces, "_decided", True)
    assert not traces.active() and traces.carrier() is None
    with traces.span("job.attempt") as nothing:
        assert nothing is None
    job_id, _ = jobs.enqueue("stub", "echo", {"key": key}, None, lambda *_: None)
    row = reads.get_job(job_id)
    assert row is not None and row["trace_context"] is None


def test_a_webhook_is_one_trace_from_its_receipt_to_its_handler(spans: InMemorySpanExporter) -> None:
    # The receiver as `integrations receiver` wraps it, in this process, publishing to the worker.
    sources = get_webhooks()
    app = create_app(sources, publish_event, get_settings().webhook_max_body_bytes)
    app.add_middleware(ObservedReceiver, sources=list(sources))
    body = json.dumps({"ref": "refs/heads/main"}).encode()
    headers = {
        "X-Hub-Signature-256": "sha256=" + hmac.new(GH_SECRET.encode(), body, hashlib.sha256).hexdigest(),
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "Content-Type": "application/json",
    }
    with serve(app) as url:
        r = requests.post(f"{url}/webhooks/gh", data=body, headers=headers, timeout=10)
    assert r.status_code == 202

    def handled() -> list[ReadableSpan]:
        done = spans.get_finished_spans()
        receive = [s for s in done if s.name == "webhook.receive" and s.attributes and s.attributes.get(
            "http.response.status_code") == 202]  # fmt: skip
        ours = [s for s in done if receive and s.context.trace_id == receive[-1].context.trace_id]
        return ours if any(s.name == "run/integrations.run_handler" for s in ours) else []

    deadline = time.monotonic() + 20
    while not (found := handled()) and time.monotonic() < deadline:
        time.sleep(0.1)
    by_id = {s.context.span_id: s for s in found}
    handler = next(s for s in found if s.name == "event.handler")
    assert handler.attributes is not None
    assert handler.attributes["event.handler"] == "handlers_for_tests.on_anything_from_github"
    chain = _ancestors(handler, by_id)
    wanted = [
        "run/integrations.run_handler",
        "apply_async/integrations.run_handler",
        "run/integrations.dispatch_event",
        "apply_async/integrations.dispatch_event",
        "webhook.receive",
    ]
    # In that order. FastAPI's own spans, when it makes them, sit between the receipt and the
    # publish; above the receipt, the sender's request when it sent a traceparent (this test's
    # requests call is instrumented).
    assert [name for name in chain if name in wanted] == wanted, chain
