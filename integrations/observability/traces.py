"""OpenTelemetry traces: our own spans, the trace context a job carries, and OTLP export.

A job is one trace from the agent's span to the upstream's answer, across processes, retries
and deferrals:

- ``job.submit`` (the agent's process) wraps validating, writing and publishing; the job row
  keeps its context (``jobs.trace_context``, W3C headers) and the message carries it as a
  ``traceparent`` header (never in the params).
- In the worker, Celery's instrumentation makes ``run/integrations.call.<service>`` a child of
  that header; under it ``job.limiter``, ``job.claim``, ``job.attempt`` (whose child is the
  ``requests`` span that sends ``traceparent`` upstream) and ``job.record``. A retry or a short
  deferral is published from inside the run, so the next run is its descendant; a job parked in
  the ledger is re-queued by beat under the context its row kept.
- The receiver's ``webhook.receive`` and a handler's ``event.handler`` trace incoming events
  the same way.

Tracing is on in a process when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``)
is set, exporting over OTLP/HTTP in batches (the SDK reads the other ``OTEL_*`` variables), or
when the agent's process set up an SDK tracer provider of its own before its first submit.
When it is off, nothing is instrumented and :func:`span` and :func:`spanned` are a flag test:
the job path pays nothing (measured in the README).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from integrations.config import get_settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

#: The name our spans' instrumentation scope has.
SCOPE = "agent-integrations"

_lock = threading.Lock()
_decided = False
_tracer: Tracer | None = None
_instrumented = False


def active() -> bool:
    """Whether this process makes spans. Decided at the first call in a process that did not
    call :func:`setup`: on when OTLP export is configured, or when the process already has an
    SDK tracer provider (an agent that traces)."""
    if not _decided:
        _decide()
    return _tracer is not None


def _on() -> bool:
    """:func:`active`, at the cost of a flag test once decided."""
    return _tracer is not None or (not _decided and active())


def _decide() -> None:
    global _decided, _tracer
    with _lock:
        if _decided:
            return
        _decided = True
    if get_settings().tracing_configured:
        setup("agent-integrations", instrument=False)
        return
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if isinstance(trace.get_tracer_provider(), TracerProvider):
        _tracer = trace.get_tracer(SCOPE)


def setup(service_name: str, exporter: SpanExporter | None = None, instrument: bool = True) -> bool:
    """Turn tracing on in this process: OTLP export when configured, or to ``exporter`` (the
    tests' in-memory one); ``instrument``: Celery's and requests' instrumentation too (a worker,
    beat, the receiver). Returns whether tracing is on; without an endpoint or an exporter it
    stays off and nothing is imported beyond the check."""
    global _decided, _tracer, _instrumented
    if exporter is None and not get_settings().tracing_configured:
        with _lock:
            _decided = True
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    with _lock:
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            # OTEL_SERVICE_NAME, when set, wins over ours (Resource.create reads it).
            provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
            trace.set_tracer_provider(provider)
            if exporter is None:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        if instrument and not _instrumented:
            from opentelemetry.instrumentation.celery import CeleryInstrumentor
            from opentelemetry.instrumentation.requests import RequestsInstrumentor

            _key_runs_per_thread()
            CeleryInstrumentor().instrument()  # type: ignore[no-untyped-call]
            RequestsInstrumentor().instrument()
            _instrumented = True
        _tracer = trace.get_tracer(SCOPE)
        _decided = True
    return True


_patched = False


def _key_runs_per_thread() -> None:
    """Celery's instrumentation keeps a run's span (between ``task_prerun`` and ``task_postrun``)
    and a publish's (between ``before_`` and ``after_task_publish``) under the task's id. A job's
    retries and deferrals reuse its id (the job's id is the task's), so in one process two of
    them can overlap: a threads pool running a retry before the first run's ``postrun``, or an
    agent's publish and an in-process worker's. Their spans would be swapped and ended in the
    wrong thread. Each pair of signals fires in one thread, so the thread joins the key."""
    global _patched
    if _patched:
        return
    from opentelemetry.instrumentation.celery import utils

    def per_thread(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def keyed(task: Any, task_id: str, *args: Any, **kwargs: Any) -> T:
            return fn(task, f"{task_id}@{threading.get_ident()}", *args, **kwargs)

        return keyed

    for name in ("attach_context", "detach_context", "retrieve_context"):
        setattr(utils, name, per_thread(getattr(utils, name)))
    _patched = True


def teardown() -> None:
    """Stop making spans in this process and remove the instrumentation (tests)."""
    global _tracer, _instrumented
    with _lock:
        if _instrumented:
            from opentelemetry.instrumentation.celery import CeleryInstrumentor
            from opentelemetry.instrumentation.requests import RequestsInstrumentor

            CeleryInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
            RequestsInstrumentor().uninstrument()
            _instrumented = False
        _tracer = None


@contextlib.contextmanager
def _span(name: str, attributes: Mapping[str, Any]) -> Iterator[None]:
    from opentelemetry.trace import Status, StatusCode
    from opentelemetry.util.types import AttributeValue

    assert _tracer is not None
    attrs: dict[str, AttributeValue] = {k: v for k, v in attributes.items() if v is not None}
    # Celery's Ignore (a deferral, a duplicate delivery) and Retry end a run as planned: not
    # errors. Anything else is recorded by its class: the messages are ours and clean, but a
    # traceback's locals are not sent anyway.
    with _tracer.start_as_current_span(
        name, attributes=attrs, record_exception=False, set_status_on_exception=False
    ) as s:
        try:
            yield
        except BaseException as e:
            kind = type(e).__name__
            if kind in ("Ignore", "Retry"):
                s.set_attribute("celery.outcome", kind.lower())
            else:
                s.set_attribute("error.type", kind)
                s.set_status(Status(StatusCode.ERROR, kind))
            raise


_NOTHING = contextlib.nullcontext()


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[None]:
    """A span named ``name`` around the block, child of the current one; nothing when off."""
    if not _on():
        return _NOTHING
    return _span(name, attributes)


def spanned(name: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorate a function to run in a span named ``name`` (a flag test when tracing is off)."""

    def wrap(fn: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> T:
            if not _on():
                return fn(*args, **kwargs)
            with _span(name, {}):
                return fn(*args, **kwargs)

        return inner

    return wrap


def annotate(**attributes: Any) -> None:
    """Set attributes on the current span (the job's id once it has one...)."""
    if not _on():
        return
    from opentelemetry import trace

    current = trace.get_current_span()
    for key, val in attributes.items():
        if val is not None:
            current.set_attribute(key, val)


def carrier() -> dict[str, str] | None:
    """The current trace context as W3C headers (``traceparent``, ``tracestate``): what a job
    row keeps and a message carries. ``None`` when off or outside any span."""
    if not _on():
        return None
    from opentelemetry.propagate import inject

    out: dict[str, str] = {}
    inject(out)
    return out or None


@contextlib.contextmanager
def resumed(context: Mapping[str, str] | None) -> Iterator[None]:
    """Make a stored trace context (a job row's) the current one within the block, so what it
    publishes continues that trace rather than the caller's (beat's dispatcher). Without one,
    the block runs outside any trace: a job never joins beat's."""
    if not _on():
        yield
        return
    from opentelemetry import context as otel_context
    from opentelemetry.propagate import extract

    token = otel_context.attach(extract(dict(context or {}), context=otel_context.Context()))
    try:
        yield
    finally:
        otel_context.detach(token)
