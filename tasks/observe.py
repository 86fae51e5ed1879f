"""Which process observes what, wired to Celery's signals (the library is in
:mod:`integrations.observability`).

- Logging (worker and beat, after Celery set up its own): the JSON formatter on Celery's
  handlers when ``LOG_FORMAT=json``; beat's dispatchers and sweepers at DEBUG when idle.
- A worker node (``worker_init``, in the main process, before the pool forks): metrics as role
  ``worker`` and tracing; the children inherit both (the SDK's batch exporter restarts its
  thread in each child).
- Beat (``beat_init``): metrics as role ``beat`` and tracing.
- The receiver (:func:`receiver`), the exporter (:func:`serve_exporter`) and the CLI
  (:func:`cli_logging`) are set up by their commands.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping
from typing import Any

from celery import current_task
from celery.signals import after_setup_logger, after_setup_task_logger, beat_init, worker_init
from fastapi import FastAPI

import beat_schedule
from integrations.config import get_settings
from integrations.errors import ConfigError
from integrations.observability import logs, metrics, metrics_exporter, traces
from integrations.observability.asgi import ObservedReceiver
from tasks.celeryapp import app

log = logging.getLogger(__name__)

#: Beat's dispatchers and sweepers: every few seconds, mostly finding nothing.
HOUSEKEEPING = frozenset(
    [e["task"] for e in beat_schedule.DISPATCHERS.values()] + list(beat_schedule.SWEEPERS.values())
)


def _task_context() -> Mapping[str, Any]:
    """The Celery task a log line was written in, for JSON lines (text lines have Celery's)."""
    if not current_task or current_task.request.id is None:  # a proxy: false outside a task
        return {}
    return {"task": current_task.name, "task_id": current_task.request.id}


@after_setup_logger.connect
@after_setup_task_logger.connect
def _log_format(logger: logging.Logger, **_: Any) -> None:
    logs.quiet_housekeeping(HOUSEKEEPING)
    if get_settings().log_format == "json":
        logs.use_json(logger.handlers, _task_context)


@worker_init.connect
def _worker_starts(**_: Any) -> None:
    metrics.start("worker")
    traces.setup("agent-integrations-worker")


@beat_init.connect
def _beat_starts(**_: Any) -> None:
    metrics.start("beat")
    traces.setup("agent-integrations-beat")


def receiver(api: FastAPI, sources: Mapping[str, Any]) -> FastAPI:
    """The receiver's process observed: metrics as role ``receiver`` served at its ``/metrics``,
    tracing, and each webhook counted and traced (:class:`ObservedReceiver`)."""
    metrics.start(metrics.RECEIVER)
    traces.setup("agent-integrations-receiver")
    api.add_middleware(ObservedReceiver, sources=list(sources))
    return api


def queue_depths() -> dict[str, int]:
    """Messages waiting in each of the app's queues, as the broker counts them (a queue the
    broker does not know yet holds none)."""
    names = list(app.amqp.queues) or [app.conf.task_default_queue]
    depths: dict[str, int] = {}
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        for name in names:
            try:
                depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
            except conn.channel_errors:
                depths[name] = 0
                channel = conn.channel()  # a refused passive declare may close the channel (AMQP)
    return depths


def serve_exporter(stop: threading.Event | None = None) -> None:
    """``integrations metrics``: serve the exporter on ``METRICS_HOST:METRICS_PORT`` until
    SIGTERM or SIGINT."""
    s = get_settings()
    logs.setup(s.log_level, s.log_format)
    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    registry = metrics_exporter.exporter_registry(queue_depths)
    metrics_exporter.serve(registry, s.metrics_host, s.metrics_port, stop)


def cli_logging() -> None:
    """The CLI's log lines (a library's warning, a submitted job at ``LOG_LEVEL=INFO``): on
    stderr in ``LOG_FORMAT``, at WARNING unless ``LOG_LEVEL`` is set."""
    import os

    try:
        s = get_settings()
        fmt, level = s.log_format, s.log_level if "LOG_LEVEL" in os.environ else "WARNING"
    except ConfigError:
        fmt, level = "text", "WARNING"  # the command itself reports the broken setting
    logs.setup(level, fmt)
