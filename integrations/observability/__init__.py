"""What an operator watches: Prometheus metrics, structured logs and OpenTelemetry traces.

- :mod:`~integrations.observability.metrics`: the counters and histograms every process records
  (prometheus_client's multiprocess files); :mod:`~integrations.observability.metrics_exporter`:
  the exporter that serves them with the ledger's, the breakers' and the broker's state, and
  the receiver's ``/metrics``.
- :mod:`~integrations.observability.logs`: the JSON and text formatters, and the filter that
  keeps beat's idle housekeeping at DEBUG.
- :mod:`~integrations.observability.traces`: spans of our own, the trace context a job carries,
  and OTLP export when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (nothing, at no cost, when not).
- :mod:`~integrations.observability.journal`: one call per job event (submitted, attempt, retry,
  deferral, outcome) feeds the three.

The Celery wiring (which process starts what, on which signal) is the app layer's:
``tasks/observe.py``.
"""
